"""A shard of a sharded collection as a task that runs anywhere that reaches the database: `run_shard(payload)`,
registered as the job task `collect-shard` (jobs.stage.TASKS), called by an executor (this process, a worker
process, a Ray task) with the plain data of collect.run.ShardPlan.payload. The subject is loaded once per process
and kept for the next shard of the same model, the store once per database."""

from __future__ import annotations

import socket
from typing import Any

from autointerp.collect.run import collect_shard
from autointerp.config import RunConfig

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
