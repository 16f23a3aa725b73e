"""Scale-out benchmark: sharded collection on a local Ray cluster against the single-process collector, on the same
tokens, with the rows compared.

  single    run_collect in this process (model loaded beforehand, excluded)
  sharded   the same collection as N shards, each a Ray task on a local cluster (ray.init(num_cpus=N), no
            dashboard), merged by the driver (collect.shards.collect_sharded); the workers load the model in a
            warm-up collection first, so the figure is the overhead of sharding, not of process start-up
  identical 1 when both databases hold the same features, statistics, histograms and records, bit for bit

On one machine the shards share its cores, so sharded_ratio (single time / sharded time) measures overhead: 1.0 is
none. Each Ray worker runs torch with one thread (Ray sets OMP_NUM_THREADS=1), the single process with all cores.

  endpoint_scaling  an LLM block with base_urls of 1, 2 and 4 stub OpenAI-compatible servers on 127.0.0.1
            (llm/stub_server.py), each serving one request at a time with a fixed latency (--latency-ms, 50), driven
            through the LLM client every stage calls (chat_many, concurrency 1 per server), the same number of
            requests per server each time: the 4-server throughput / (4 x the 1-server throughput); 1.0 is linear.

Last line: sharded_ratio=... identical=... shard_tok_s=... single_tok_s=... endpoint_scaling=... endpoint_rps_1=...

    .venv/bin/python bench/scale.py [--quick] [--shards N] [--device cpu|cuda] [--only collect|endpoints]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any


def _cfg(db: str, tokens: int, device: str, batch: int) -> Any:
    from autointerp.config import RunConfig

    return RunConfig.model_validate({
        "db": db,
        "model": {"device": device},
        "corpus": {"max_tokens": tokens, "ctx_len": 64},
        "collect": {"sites": ["blocks.6.mlp.post"], "batch_size": batch, "top_k": 20, "n_random": 10},
    })  # fmt: skip


def _dump(db: Path) -> list[Any]:
    con = sqlite3.connect(db)
    try:
        feats = con.execute("select key, status, density, n_tokens, histogram, max_act, mean_act from feature "
                            "order by 1").fetchall()  # fmt: skip
        recs = con.execute("select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
                           "join feature f on f.id = r.feature_id join context c on c.id = r.context_id "
                           "order by 1, 2").fetchall()  # fmt: skip
        return [feats, recs]
    finally:
        con.close()


def endpoint_scaling(per_server: int, latency_s: float) -> dict[str, float]:
    """Requests per second through the LLM client with 1, 2 and 4 stub servers, and the scaling figure."""
    import subprocess
    import sys
    from collections import Counter

    from autointerp.config import LLMConfig
    from autointerp.llm.client import client_for
    from autointerp.llm.types import ChatRequest, ChatResult, Message

    rps: dict[int, float] = {}
    for n in (1, 2, 4):
        # the servers run in a process of their own, as real ones do (not sharing this interpreter's lock)
        code = f"from autointerp.llm.stub_server import serve; serve({n}, {latency_s!r})"
        with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) as proc:  # fmt: skip
            assert proc.stdout is not None and proc.stdin is not None
            urls = proc.stdout.readline().split()
            cfg = LLMConfig(backend="openai", model="stub", base_urls=urls, concurrency=1)
            client = client_for(cfg)  # no cache: every request is a call
            client.chat_many([ChatRequest(messages=(Message("user", "warm-up"),))])
            reqs = [ChatRequest(messages=(Message("user", f"feature {i}"),)) for i in range(per_server * n)]
            t = time.perf_counter()
            out = client.chat_many(reqs)
            rps[n] = len(reqs) / (time.perf_counter() - t)
            proc.stdin.close()
        spread = Counter(r.endpoint for r in out if isinstance(r, ChatResult))
        ok = sum(spread.values())
        print(f"endpoints={n}: {rps[n]:.1f} req/s, {ok}/{len(reqs)} ok, per server {sorted(spread.values())}",
              flush=True)  # fmt: skip
    return {"endpoint_scaling": rps[4] / (4 * rps[1]), **{f"endpoint_rps_{n}": v for n, v in rps.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small slice (about two minutes)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--only", choices=["collect", "endpoints"], default=None, help="one part of the benchmark")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="each stub server's latency per request")
    args = ap.parse_args()
    tokens = args.tokens or (12_000 if args.quick else 200_000)
    ends: dict[str, float] = {}
    if args.only != "collect":
        ends = endpoint_scaling(40 if args.quick else 200, args.latency_ms / 1000)
    tail = " ".join(f"{k}={v:.3f}" if k == "endpoint_scaling" else f"{k}={v:.1f}" for k, v in ends.items())
    if args.only == "endpoints":
        print(tail)
        return
    import ray

    from autointerp.collect.run import run_collect
    from autointerp.jobs.ray_executor import RayExecutor
    from autointerp.run.job import PipelineJob
    from autointerp.store import open_store
    from autointerp.subject.model import load_subject

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cfg1 = _cfg(f"sqlite:///{work}/single.sqlite", tokens, args.device, 16)
    subject = load_subject(cfg1.model.name, device=args.device)
    t = time.perf_counter()
    s1 = run_collect(cfg1, open_store(cfg1.db), subject=subject)
    single = time.perf_counter() - t
    print(f"single: {single:.1f}s, {s1.n_tokens} tokens, pass {s1.tokens_per_second:.0f} tok/s", flush=True)

    ray.init(num_cpus=args.shards, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        warm = _cfg(f"sqlite:///{work}/warm.sqlite", 2_000, args.device, 16)
        PipelineJob(warm, open_store(warm.db), stages=["collect"], executor=RayExecutor(),
                    shards=args.shards).run()  # fmt: skip
        cfg2 = _cfg(f"sqlite:///{work}/sharded.sqlite", tokens, args.device, 16)
        job = PipelineJob(cfg2, open_store(cfg2.db), stages=["collect"], executor=RayExecutor(), shards=args.shards)
        t = time.perf_counter()
        job.run()
        sharded = time.perf_counter() - t
    finally:
        ray.shutdown()
    shard_rate = sum(s["tokens"] for s in job.shard_log) / max(sum(s["seconds"] for s in job.shard_log), 1e-9)
    identical = int(_dump(work / "single.sqlite") == _dump(work / "sharded.sqlite"))
    print(f"sharded ({args.shards} Ray tasks): {sharded:.1f}s; per shard {shard_rate:.0f} tok/s", flush=True)
    print(
        f"sharded_ratio={single / sharded:.3f} identical={identical} shard_tok_s={shard_rate:.0f} "
        f"single_tok_s={s1.tokens_per_second:.0f} shards={args.shards} tokens={s1.n_tokens} device={args.device}"
        + (f" {tail}" if tail else "")
    )


if __name__ == "__main__":
    main()
