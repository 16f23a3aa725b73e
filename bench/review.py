"""Review page benchmark: server time of its pages on a synthetic database of N features (100k by default), each
with an ok explanation scored by simulation and detection, a third with a verdict (bench/query.py's database),
plus, for the features whose pages are opened, contexts and records (24 per feature, 64 tokens, top / quantile /
random) decoded with the embedded SmolLM2 tokenizer, and reviews of a tenth of the explanations.

  list_p95_ms        the feature list, filtered and sorted (score with a site and a minimum; max with a review
                     state; a verdict), and the next page by its cursor (<= 100)
  feature_page_p95_ms  a feature page: statistics, histogram, explanation with scores and verdict, 24 records (<= 50)
  queue_next_p95_ms  the review queue's next item after a decision (lowest score first; the order is computed once
                     per change of the database, queue_build_s, and not in the p95) (<= 50)
  search_p95_ms      the search page: full text of 2-word queries (<= 100)
  startup_s          `autointerp review` from process start to the first page served (<= 2)

Times are the 95th percentile over repeats after one warm-up, measured in-process through the ASGI app (routing,
the store's queries and rendering; no network).

    .venv/bin/python bench/review.py [--quick] [--n N]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from query import WORDS, build, p95  # noqa: E402

N_PAGES = 200  # features given records (the pages the benchmark opens)


def add_records(store: Any, n_features: int, seed: int = 0) -> list[str]:
    """Contexts and records for the first n_features features, and the SmolLM2 tokenizer as the model's; returns
    their keys."""
    from sqlalchemy import insert

    from autointerp.store.blobs import pack_f16, pack_i32
    from autointerp.store.tables import Context, Document, Record
    from autointerp.subject.files import DEFAULT_MODEL, materialize, resolve

    rng = np.random.default_rng(seed)
    smol = materialize(resolve(DEFAULT_MODEL))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE subject_model SET source = ? WHERE id = 'synth'", (str(smol),))
        conn.execute(insert(Document.__table__), [{"corpus_id": "c", "idx": 0, "name": "synth.txt"}])  # type: ignore[attr-defined]
        n_ctx = 2000
        conn.execute(insert(Context.__table__), [  # type: ignore[attr-defined]
            {"corpus_id": "c", "idx": i, "doc_idx": 0, "offset": 64 * i,
             "tokens": pack_i32(rng.integers(100, 20000, 64).astype(np.int32))} for i in range(n_ctx)
        ])  # fmt: skip
        ctx_ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM context ORDER BY id")]
        feats = conn.exec_driver_sql(f"SELECT id, key FROM feature ORDER BY id LIMIT {n_features}").all()
        rows = []
        for fid, _key in feats:
            picks = rng.choice(len(ctx_ids), 24, replace=False)
            for k, c in enumerate(picks):
                role = "top" if k < 10 else "quantile" if k < 18 else "random"
                acts = np.clip(rng.standard_normal(63), 0, None).astype(np.float32)
                rows.append({"feature_id": fid, "context_id": ctx_ids[c], "role": role, "split": "test" if k % 2
                             else "train", "rank": k, "bin": (k - 10) // 4 if role == "quantile" else None,
                             "max_act": float(acts.max()), "acts": pack_f16(acts)})  # fmt: skip
        conn.execute(insert(Record.__table__), rows)  # type: ignore[attr-defined]
    return [k for _f, k in feats]


def add_reviews(store: Any, fraction: float = 0.1, seed: int = 0) -> None:
    from sqlalchemy import insert

    from autointerp.store.tables import Review, utcnow

    rng = random.Random(seed)
    with store.engine.begin() as conn:
        pairs = conn.exec_driver_sql("SELECT id, feature_id FROM explanation ORDER BY id").all()
        rows = [{"explanation_id": e, "feature_id": f, "reviewer": rng.choice(("ann", "bob")),
                 "decision": rng.choice(("accept", "accept", "reject", "edit", "flag")), "created_at": utcnow()}
                for e, f in pairs if rng.random() < fraction]  # fmt: skip
        for r in rows:
            if r["decision"] == "edit":
                r["text"] = "an edited explanation"
        conn.execute(insert(Review.__table__), rows)  # type: ignore[attr-defined]


def timed(client: Any, urls: list[str]) -> list[float]:
    client.get(urls[0])  # warm-up
    out = []
    for u in urls:
        t = time.perf_counter()
        r = client.get(u)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, (u, r.status_code, r.text[-500:])
    return out


def startup(url: str) -> float:
    """Seconds from `autointerp review` starting to its first page served."""
    exe = Path(sys.executable).with_name("autointerp")
    t = time.perf_counter()
    proc = subprocess.Popen([str(exe), "review", "--db", url, "--port", "0"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        while "review page:" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"autointerp review exited with {proc.returncode}")
        address = line.split("review page:", 1)[1].strip()
        with urllib.request.urlopen(address, timeout=30) as resp:
            assert resp.status == 200
        return time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (the database keeps N features)")
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    repeats = 30 if args.quick else 100

    from starlette.testclient import TestClient

    from autointerp.review.app import create_app, settle
    from autointerp.store.browse import ListQuery, list_page
    from autointerp.store.search import ensure_query_schema

    figures: dict[str, Any] = {"n_features": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "r.sqlite"
        t = time.perf_counter()
        store = build(db, args.n)
        keys = add_records(store, N_PAGES)
        add_reviews(store)
        ensure_query_schema(store)
        list_page(store, ListQuery())  # the list's indexes, made once per database
        print(f"built {args.n} features (records for {len(keys)}) in {time.perf_counter() - t:.1f}s")
        client = TestClient(create_app(store, reviewer="bench"), base_url="http://127.0.0.1:8000")
        client.get("/review?order=lowest")  # warm: the queue's order, the tokenizer
        settle()  # as `autointerp review` does once started
        rng = random.Random(2)

        lists = []
        for k in range(repeats):
            site = f"blocks.{k % 4}.mlp.post"
            lists += [f"/?sort=score&site={site}&min=0.5", "/?sort=max&review=unreviewed",
                      f"/?sort=score&verdict={('verified', 'unverified', 'contradicted')[k % 3]}"]  # fmt: skip
        first = client.get("/?sort=score&min=0.2").text
        after = first.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0].replace("&amp;", "&")
        lists.append(after)
        figures["list_p95_ms"] = p95(timed(client, lists))

        pages = [f"/feature/{rng.choice(keys)}" for _ in range(repeats)]
        figures["feature_page_p95_ms"] = p95(timed(client, pages))

        t = time.perf_counter()
        client.app.state.review.queues.clear()  # type: ignore[attr-defined]
        client.get("/review?order=lowest")
        figures["queue_build_s"] = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            page = client.get("/review?order=lowest").text
            eid = page.split('name="explanation" value="', 1)[1].split('"', 1)[0]
            token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            client.post("/decide", data={"csrf": token, "explanation": eid, "decision": "accept"},
                        follow_redirects=False)  # fmt: skip
            t = time.perf_counter()
            r = client.get(f"/review?order=lowest&after={eid}")
            times.append(time.perf_counter() - t)
            assert r.status_code == 200 and f'value="{eid}"' not in r.text.split("decide-accept", 1)[1][:400]
        figures["queue_next_p95_ms"] = p95(times)

        searches = [f"/search?q={rng.choice(WORDS)}+{rng.choice(WORDS)}" for _ in range(repeats)]
        figures["search_p95_ms"] = p95(timed(client, searches))

        store.engine.dispose()
        figures["startup_s"] = sorted(startup(f"sqlite:///{db}") for _ in range(3))[1]  # the median of 3
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
