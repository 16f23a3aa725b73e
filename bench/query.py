"""Query benchmark: search, filtered listing and export on a synthetic database of N features (100k by default),
each with an ok explanation scored by simulation and detection, a third with a verdict; written through the
store's bulk paths (write_features, Core inserts) into SQLite.

  fts_p95_ms            full-text `search` of 2-word queries (<= 50)
  semantic_p95_ms       `search --semantic` over N embeddings, query embedded at search time (<= 100)
  list_filtered_p95_ms  `features list` with --verdict, --method/--min-score and --site (<= 50)
  export_s              `export` of every feature as JSON lines (<= 30)
  index_build_s         the FTS index (built over rows written before it) plus the embeddings of every
                        explanation; with --quick, embeddings are computed for EMBED_QUICK texts and the rest are
                        written as random unit vectors (the search costs the same), and index_build_s extrapolates
                        the embedding time from the measured rate (embed_extrapolated=1 says so)

Timings are the 95th percentile of repeats after one warm-up (the first search builds the in-memory matrix).

    .venv/bin/python bench/query.py [--quick] [--n N]
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_WORDS = (
    "tax policy budget war army navy peace treaty trade tariff railroad bank currency gold silver labor union "
    "strike wage farm crop wheat cotton slavery freedom court judge law congress senate vote election party "
    "school education health hospital disease science research energy oil coal steel industry factory market "
    "price inflation debt deficit loan credit income revenue spending reform welfare pension veteran soldier "
    "immigration border citizen rights liberty justice crime police prison drug family child woman worker "
    "number date year month name place city state nation country world ocean river mountain land water air"
)
WORDS = _WORDS.split()
FORMS = (
    "mentions of {a} and {b}",
    "the word {a} in discussions of {b}",
    "{a}, {b} and related terms",
    "tokens about {a} near {b}",
    "phrases on {a} policy and {b}",
)
EMBED_QUICK = 2000


def p95(times: list[float]) -> float:
    return float(np.percentile(np.asarray(times) * 1000, 95))


def build(db: Path, n: int, seed: int = 0) -> Any:
    """The synthetic database; returns its store."""
    from sqlalchemy import insert

    from autointerp.store import open_store
    from autointerp.store.tables import Corpus, Explanation, Run, Score, SubjectModel, Verdict, utcnow
    from autointerp.store.writes import FeatureRow, write_features

    rng = random.Random(seed)
    store = open_store(f"sqlite:///{db}")
    with store.session() as s:
        s.add(SubjectModel(id="synth", family="gpt2", source="-", n_layers=12, d_model=768))
        s.add(Corpus(id="c", name="synth", source="-", tokenizer="-", ctx_len=64, bos_token_id=0, n_docs=1,
                     n_contexts=1, seed=0))  # fmt: skip
        s.add(Run(stage="collect", key="synth", status="done"))
        s.commit()
        run = s.exec(Run.__table__.select()).first()  # type: ignore[attr-defined]
    hist = {"edges": [round(0.1 * i, 1) for i in range(49)], "counts": [1] * 48}
    sites = [f"blocks.{i}.mlp.post" for i in range(4)]
    feats = (
        FeatureRow("synth", sites[i % 4], "neurons" if i % 2 else "sae-synth", i, "ok", 1 + rng.random() * 9,
                   rng.random(), rng.random() * 0.1, 10**6, hist, "c", run.id)
        for i in range(n)
    )  # fmt: skip
    write_features(store, feats)
    with store.engine.begin() as conn:
        fids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM feature ORDER BY id")]
        texts = [rng.choice(FORMS).format(a=rng.choice(WORDS), b=rng.choice(WORDS)) for _ in fids]
        base = dict(explainer="llm", model="fake:synth", prompt="explain", prompt_hash="h", config_hash="c",
                    config={}, status="ok", error=None, raw=None, n_records=20, prompt_tokens=500, attempts=1,
                    run_id=run.id, created_at=utcnow())  # fmt: skip
        rows = [{**base, "feature_id": f, "text": t} for f, t in zip(fids, texts, strict=True)]
        conn.execute(insert(Explanation.__table__), rows)  # type: ignore[attr-defined]
        eids = [r[0] for r in conn.exec_driver_sql("SELECT id, feature_id FROM explanation ORDER BY id")]
        scores = []
        for e, f in zip(eids, fids, strict=True):
            for method in ("simulation", "detection"):
                v = rng.random()
                scores.append(dict(explanation_id=e, feature_id=f, method=method, model="fake:synth", prompt_hash="h",
                                   config_hash="c", config={}, status="ok", value=v, ci_low=v - 0.1, ci_high=v + 0.1,
                                   n=40, n_failed=0, details={}, error=None, run_id=run.id,
                                   created_at=utcnow()))  # fmt: skip
        conn.execute(insert(Score.__table__), scores)  # type: ignore[attr-defined]
        verdicts = [
            dict(explanation_id=e, feature_id=f, verdict=rng.choice(("verified", "unverified", "contradicted")),
                 config_hash="v", reason="synthetic", run_id=run.id, created_at=utcnow())
            for e, f in zip(eids, fids, strict=True) if rng.random() < 1 / 3
        ]  # fmt: skip
        conn.execute(insert(Verdict.__table__), verdicts)  # type: ignore[attr-defined]
    return store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()

    from autointerp.query.embeddings import update_embeddings
    from autointerp.query.encoder import default_encoder
    from autointerp.query.export import export
    from autointerp.query.search import search
    from autointerp.store.embeddings import unembedded, write_embeddings
    from autointerp.store.queries import list_features
    from autointerp.store.search import ensure_query_schema

    figures: dict[str, Any] = {"n_features": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store = build(Path(tmp) / "q.sqlite", args.n)
        print(f"built {args.n} features with explanations, scores and verdicts in {time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        ensure_query_schema(store)
        fts_build = time.perf_counter() - t
        enc = default_encoder()
        todo = unembedded(store, enc.name)
        if args.quick:
            sample = todo[:EMBED_QUICK]
            t = time.perf_counter()
            vecs = enc.encode([txt for _i, txt in sample])
            per_text = (time.perf_counter() - t) / len(sample)
            write_embeddings(store, enc.name, [i for i, _t in sample], np.asarray(vecs, np.float32))
            rest = todo[EMBED_QUICK:]
            rnd = np.random.default_rng(0).standard_normal((len(rest), vecs.shape[1])).astype(np.float32)
            rnd /= np.linalg.norm(rnd, axis=1, keepdims=True)
            write_embeddings(store, enc.name, [i for i, _t in rest], rnd)
            embed_s = per_text * len(todo)
            figures["embed_extrapolated"] = 1
        else:
            t = time.perf_counter()
            update_embeddings(store, enc)
            embed_s = time.perf_counter() - t
            figures["embed_extrapolated"] = 0
        print(f"index: FTS {fts_build:.1f}s, embeddings {embed_s:.1f}s{' (extrapolated)' if args.quick else ''}")
        figures["index_build_s"] = fts_build + embed_s

        rng = random.Random(1)
        queries = [f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in range(args.repeats)]
        search(store, "tax policy", limit=20)  # warm-up: statements prepared, pages cached
        times = []
        for q in queries:
            t = time.perf_counter()
            search(store, q, limit=20)
            times.append(time.perf_counter() - t)
        figures["fts_p95_ms"] = p95(times)

        search(store, "tax policy", semantic=True, limit=20, encoder=enc)  # warm-up: the matrix is read once
        times = []
        for q in queries:
            t = time.perf_counter()
            search(store, q, semantic=True, limit=20, encoder=enc)
            times.append(time.perf_counter() - t)
        figures["semantic_p95_ms"] = p95(times)

        verdicts = ("verified", "unverified", "contradicted")
        times = []
        for k in range(args.repeats + 1):
            t = time.perf_counter()
            rows = list_features(store, site=f"blocks.{k % 4}.mlp.post", verdict=verdicts[k % 3],
                                 score_method="simulation", min_score=0.5, sort="score", limit=50)  # fmt: skip
            if k:
                times.append(time.perf_counter() - t)
        assert rows, "the filtered list found nothing: the synthetic data or the filters are wrong"
        figures["list_filtered_p95_ms"] = p95(times)

        t = time.perf_counter()
        sink = io.StringIO()
        summary = export(store, sink)
        figures["export_s"] = time.perf_counter() - t
        assert summary.features == args.n, (summary, args.n)
        print(f"export: {summary.features} features, {sink.tell() / 1e6:.0f} MB of JSON lines")
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
