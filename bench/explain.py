"""Explainer throughput: the local backend (in-process SmolLM2) and llama.cpp's server at concurrency 1 vs 8.

Measured side by side in one run on the same features of the same database (SmolLM2 neurons of blocks.6.mlp.post
collected over a SOTU slice), each configuration on a fresh copy of the database so that no answer comes from the
response cache:
  local      `explain` with backend local (batched generation in-process)
  server c1  backend openai against llama.cpp's server (the same GGUF) with concurrency 1
  server c8  the same with concurrency 8
  rerun      the local configuration again on its own database: must make 0 LLM calls
Figures: features per minute, mean prompt tokens per explanation, and the c8 / c1 ratio.
Last line: local_features_per_min=... mean_prompt_tokens=... server_c1_per_min=... server_c8_per_min=...
concurrency_speedup=... rerun_calls=...

    .venv/bin/python bench/explain.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from autointerp.collect.run import run_collect
from autointerp.config import load_config
from autointerp.explain.run import run_explain
from autointerp.llm.llamacpp import llama_server
from autointerp.store import open_store
from autointerp.subject.files import _smollm2_gguf


def _collect(work: Path, tokens: int) -> Path:
    db = work / "base.sqlite"
    cfg = load_config(
        None,
        {"db": f"sqlite:///{db}", "corpus.max_tokens": tokens, "collect.sites": ["blocks.6.mlp.post"]},
    )
    store = open_store(cfg.db)
    run_collect(cfg, store)
    store.engine.dispose()
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return db


def _run(base: Path, work: Path, name: str, n: int, llm: dict[str, Any]) -> dict[str, float]:
    db = work / f"{name}.sqlite"
    shutil.copy(base, db)
    over = {
        "db": f"sqlite:///{db}",
        "explain.limit": n,
        "explain.features": "sample",
        "explain.llm": "bench",
        "llm": {"bench": llm},
    }
    cfg = load_config(None, over)
    store = open_store(cfg.db)
    t0 = time.perf_counter()
    res = run_explain(cfg, store)
    secs = time.perf_counter() - t0
    con = sqlite3.connect(db)
    (prompt_tokens,) = con.execute("select avg(prompt_tokens) from explanation where status != 'skipped'").fetchone()
    ok = con.execute("select count(*) from explanation where status = 'ok'").fetchone()[0]
    con.close()
    done = sum(res.counts.values())
    rerun = run_explain(cfg, store)
    print(
        f"{name:>10}: {done} features in {secs:.1f}s = {60 * done / secs:.1f}/min, {ok} ok, "
        f"{res.llm_calls} calls, mean prompt tokens {prompt_tokens or 0:.0f}; rerun calls {rerun.llm_calls}"
    )
    return {"per_min": 60 * done / secs, "prompt_tokens": float(prompt_tokens or 0), "rerun_calls": rerun.llm_calls}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8 features instead of 100, smaller corpus")
    args = ap.parse_args()
    n = 8 if args.quick else 100
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        work = Path(tmp)
        base = _collect(work, 20_000 if args.quick else 60_000)
        local = _run(base, work, "local", n, {"backend": "local", "model": "smollm2-135m-instruct"})
        with llama_server(_smollm2_gguf(), log=work / "server.log") as url:
            server = {"backend": "openai", "model": "smollm2", "base_url": url, "timeout_s": 600}
            c1 = _run(base, work, "server-c1", n, {**server, "concurrency": 1})
            c8 = _run(base, work, "server-c8", n, {**server, "concurrency": 8})
    print(
        f"local_features_per_min={local['per_min']:.1f} mean_prompt_tokens={local['prompt_tokens']:.0f} "
        f"server_c1_per_min={c1['per_min']:.1f} server_c8_per_min={c8['per_min']:.1f} "
        f"concurrency_speedup={c8['per_min'] / c1['per_min']:.2f} rerun_calls={int(local['rerun_calls'])}"
    )


if __name__ == "__main__":
    main()
