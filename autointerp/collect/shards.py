"""Sharded collection: the corpus's batches split into contiguous ranges (shards), each collected on its own into
fresh samplers whose state is stored (collect_shard), then merged in order by the driver into exactly what one pass
writes (collect_sharded; the samplers merge exactly: collect.sampler.FeatureSampler.absorb).

A shard runs anywhere that reaches the database, as the job task `collect-shard` (jobs.stage.TASKS: `run_shard`),
called by an executor (this process, a worker process, a Ray task) with the plain data of ShardPlan.payload. The
subject is loaded once per process and kept for the next shard of the same model, the store once per database.
Each shard re-tokenizes the corpus (deterministic, and cheap beside the forward passes)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autointerp.collect.buffers import CheckpointError
from autointerp.collect.checkpoint import checkpoint_for
from autointerp.collect.run import (
    CollectSummary,
    begin_run,
    prepare_collection,
    write_corpus_ids,
    write_results,
)
from autointerp.config import RunConfig
from autointerp.corpus import TokenizedCorpus
from autointerp.jobs import Progress
from autointerp.store.engine import Store
from autointerp.store.runs import set_run
from autointerp.subject.model import Subject

RunShards = Callable[["ShardPlan"], bool]
"""run_shards(plan): get every shard of `plan` collected and its state stored (by whatever runs them: this process,
worker processes, Ray tasks); False when stopped before that (a Ctrl-C: the finished shards stay stored)."""


@dataclass(frozen=True)
class ShardPlan:
    """The shards of a collection: `n` contiguous ranges of its batches, each a unit whose sampler state is stored
    under `shard_key(run_key, i, n)` once collected. `stored`: the shards whose state is kept from before (a driver
    that died resumes with them)."""

    config: dict[str, Any]
    db: str
    run_key: str
    n: int
    stored: tuple[int, ...]

    @property
    def identity(self) -> str:
        """The shard units' identity (their stage is collect-shard, their feature id the shard's number)."""
        return f"{self.run_key}/{self.n}"

    def payload(self, shard: int) -> dict[str, Any]:
        """A shard's task as plain data (the executor's `call`: run_shard)."""
        return {"config": self.config, "db": self.db, "run_key": self.run_key, "shard": shard, "n_shards": self.n}


def shard_ranges(n_batches: int, n: int) -> list[tuple[int, int]]:
    """`n` contiguous ranges of batches [lo, hi), as even as can be (n <= n_batches: none is empty)."""
    return [(i * n_batches // n, (i + 1) * n_batches // n) for i in range(n)]


def shard_key(run_key: str, shard: int, n: int) -> str:
    return f"{run_key}.shard-{shard}-of-{n}"


def collect_sharded(
    cfg: RunConfig,
    store: Store,
    n_shards: int,
    run_shards: RunShards,
    *,
    subject: Subject | None = None,
    corpus: TokenizedCorpus | None = None,
    progress: Progress | None = None,
) -> CollectSummary | None:
    """Collect `cfg` as `n_shards` shards (at most one per batch) that `run_shards` gets collected, then merge their
    stored states in order and write what one pass writes (the same features, statistics, histograms and records).
    A shard whose state is stored is never collected again, so a driver that died resumes with the finished shards;
    the stored states are removed once the collection is written. None when `run_shards` was stopped."""
    t0 = time.perf_counter()
    c = prepare_collection(cfg, subject=subject, corpus=corpus)
    run, _ = begin_run(c, store)
    assert run.id is not None
    if run.status == "done":
        return CollectSummary(run.id, "already-done", c.corpus.n_contexts * c.n_pos, 0, 0, 0.0, 0.0, c.names)
    n = max(1, min(n_shards, c.n_batches))
    ranges = shard_ranges(c.n_batches, n)
    ckpts = [checkpoint_for(store, shard_key(c.run_key, i, n)) for i in range(n)]
    stored = tuple(i for i, ck in enumerate(ckpts) if ck.exists())
    plan = ShardPlan(cfg.model_dump(mode="json"), store.url, c.run_key, n, stored)
    try:
        p = c.new_pass(checkpoint_for(store, c.run_key))
        ctx_ids = write_corpus_ids(store, c, p.kill)
        set_run(store, run.id, counts={"shards": n, "shards_stored_before": len(stored)})
        t_loop = time.perf_counter()
        if not run_shards(plan):
            set_run(store, run.id, status="interrupted", error="stopped: the finished shards are kept")
            return None
        loop_seconds = time.perf_counter() - t_loop
        for i, ck in enumerate(ckpts):  # in order: each shard's batches follow the previous shard's
            part = c.new_samplers()
            if ck.restore(part, c.n_batches) != ranges[i][1]:
                raise CheckpointError(
                    f"the stored state of shard {i} of {n} ({ck}) does not end at batch {ranges[i][1]}"
                )
            for sampler, other in zip(p.samplers, part, strict=True):
                sampler.absorb(other.state())
            del part
            if progress:
                progress("merge", i + 1, n)
        p.done = p.saved = c.n_batches
        n_features, n_dead = write_results(store, p, run.id, ctx_ids, cfg.collect.write_batch_features, progress)
    except KeyboardInterrupt:
        set_run(store, run.id, status="interrupted", error="KeyboardInterrupt: the finished shards are kept")
        raise
    except Exception as exc:
        set_run(store, run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - t0
    n_tok = c.corpus.n_contexts * c.n_pos
    counts = {"tokens": n_tok, "features": n_features, "dead": n_dead, "shards": n,
              "shards_stored_before": len(stored), "loop_seconds": round(loop_seconds, 3),
              "seconds": round(seconds, 3)}  # fmt: skip
    set_run(store, run.id, status="done", progress=c.n_batches, counts=counts, error=None)
    for ck in ckpts:
        ck.remove()
    rate = c.n_batches * cfg.collect.batch_size * c.corpus.ctx_len / max(loop_seconds, 1e-9)
    return CollectSummary(run.id, "done", n_tok, n_features, n_dead, seconds, rate, c.names)


def collect_shard(
    cfg: RunConfig,
    store: Store,
    run_key: str,
    shard: int,
    n_shards: int,
    *,
    subject: Subject | None = None,
    corpus: TokenizedCorpus | None = None,
) -> dict[str, Any]:
    """Collect shard `shard` of `n_shards` (its range of batches) into fresh samplers and store their state; the
    driver (collect_sharded) merges the shards. Returns plain-data figures of the shard."""
    t0 = time.perf_counter()
    c = prepare_collection(cfg, subject=subject, corpus=corpus)
    if c.run_key != run_key:
        raise RuntimeError(f"shard {shard}: this worker's collection is {c.run_key}, the driver's {run_key}: its "
                           "code, model, corpus or config differs")  # fmt: skip
    lo, hi = shard_ranges(c.n_batches, n_shards)[shard]
    p = c.new_pass(checkpoint_for(store, shard_key(run_key, shard, n_shards)))
    for i in range(lo, hi):
        p.step(i)
    p.ckpt.save(hi, p.samplers, lambda: None)
    seconds = time.perf_counter() - t0
    n_ctx = min(hi * cfg.collect.batch_size, c.corpus.n_contexts) - lo * cfg.collect.batch_size
    return {"shard": shard, "batches": hi - lo, "tokens": n_ctx * c.corpus.ctx_len, "seconds": round(seconds, 3)}


_SUBJECTS: dict[tuple[str, str, str], Any] = {}
_STORES: dict[str, Any] = {}


def run_shard(payload: dict[str, Any]) -> dict[str, Any]:
    """Collect one shard and store its sampler state; returns its figures (and the host it ran on)."""
    from autointerp.store import open_store
    from autointerp.subject.model import load_subject

    cfg = RunConfig.model_validate(payload["config"])
    m = cfg.model
    key = (m.name, str(m.device), str(m.dtype))
    if key not in _SUBJECTS:
        _SUBJECTS.clear()  # one model per process at a time
        _SUBJECTS[key] = load_subject(m.name, device=m.device, dtype=m.dtype)
    if payload["db"] not in _STORES:
        _STORES[payload["db"]] = open_store(payload["db"])
    store = _STORES[payload["db"]]
    out = collect_shard(cfg, store, payload["run_key"], int(payload["shard"]), int(payload["n_shards"]),
                        subject=_SUBJECTS[key])  # fmt: skip
    return {**out, "host": socket.gethostname()}
