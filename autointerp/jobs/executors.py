"""Executors: where the loop's claimed chunks run. The loop claims units under leases and hands each chunk to an
executor as plain data (`ChunkSpec`: the config, the database URL, the stage, the part's identity, the run id, the
feature ids), so a chunk can run in this process, in another process, or on another machine that reaches the
database; the result comes back as plain data too (`ChunkResult`). Rows are written by whoever runs the chunk.

- `LocalExecutor`: this process, one chunk at a time (LLM concurrency comes from the client's own threads).
- `ProcessExecutor`: a pool of N worker processes on this machine (`autointerp run --workers N`); each builds the
  part from the spec once and keeps it for later chunks.
- `jobs.ray_executor.RayExecutor`: Ray tasks across a cluster (`autointerp run --engine ray`), in its own module
  so that nothing else imports Ray.

Besides stage chunks, an executor runs tasks (`call`: a name in jobs.stage.TASKS and a plain-data payload), e.g. a
shard of a sharded collection.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from autointerp.jobs.stage import STAGES, ChunkResult, Stage, run_task, stage_class

if TYPE_CHECKING:
    from autointerp.store.engine import Store


@dataclass(frozen=True)
class ChunkSpec:
    """A claimed chunk as plain data: all another process needs to run it."""

    config: dict[str, Any]  # RunConfig.model_dump(mode="json")
    db: str
    stage: str  # a name in jobs.stage.STAGES
    identity: str  # which of the stage's parts
    run_id: int
    feature_ids: tuple[int, ...]


class Executor(Protocol):
    """Runs chunks for the loop. `slots`: how many chunks the loop keeps in flight at once."""

    slots: int

    def submit(self, stage: Stage, spec: ChunkSpec) -> Future[ChunkResult]:
        """Start the chunk; `stage` is the loop's own instance of the part (an executor in this process may use it,
        another one rebuilds it from the spec)."""
        ...

    def call(self, task: str, payload: dict[str, Any]) -> Future[dict[str, Any]]:
        """Start the task registered under `task` (jobs.stage.TASKS) on its plain-data payload."""
        ...

    def start(self, stages: Sequence[str]) -> None:
        """Get ready for chunks of these stages while the loop plans (e.g. start worker processes)."""
        ...

    def cancel(self) -> None:
        """Stop at once: chunks not started are dropped, running ones are abandoned (their units go back)."""
        ...

    def close(self) -> None:
        """Release the executor's resources once the job is over."""
        ...


class LocalExecutor:
    """This process, one chunk at a time: `submit` runs the chunk before it returns."""

    slots = 1

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, stage: Stage, spec: ChunkSpec) -> Future[ChunkResult]:
        from autointerp.store.queries import features_by_ids

        feats = features_by_ids(self.store, list(spec.feature_ids))
        stage.prepare(feats)
        fut: Future[ChunkResult] = Future()
        fut.set_result(stage.execute(feats, spec.run_id))
        return fut

    def call(self, task: str, payload: dict[str, Any]) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        fut.set_result(run_task(task, payload))
        return fut

    def start(self, stages: Sequence[str]) -> None:
        pass

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


class ProcessExecutor:
    """A pool of `workers` processes on this machine (spawned, not forked: the parent may hold threads, a model and
    database connections). Each process opens the store and builds a part once, then runs chunk after chunk."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.slots = workers
        self._pool: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.slots, mp_context=ctx, initializer=_worker_init)
        return self._pool

    def start(self, stages: Sequence[str]) -> None:
        # The workers import the job's stages (seconds; torch for some) while the loop plans, not after.
        pool = self._get()
        for _ in range(self.slots):
            pool.submit(_warm, [s for s in stages if s in STAGES])

    def submit(self, stage: Stage, spec: ChunkSpec) -> Future[ChunkResult]:  # noqa: ARG002 (rebuilt from the spec)
        return self._get().submit(run_spec, spec)

    def call(self, task: str, payload: dict[str, Any]) -> Future[dict[str, Any]]:
        return self._get().submit(run_task, task, payload)

    def cancel(self) -> None:
        if self._pool is not None:
            for proc in list(getattr(self._pool, "_processes", {}).values()):
                proc.terminate()  # a chunk halfway: its rows are written per feature, its units go back
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _worker_init() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the driver decides (finish the chunks in flight, or
    # stop at once and terminate the pool); a worker must not die halfway through a chunk on the first one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _warm(stages: Sequence[str]) -> None:
    import time

    for name in stages:
        stage_class(name)
    time.sleep(0.2)  # long enough that each worker of the pool takes one of these


_PARTS: dict[tuple[str, str, str, str], tuple[Stage, Store]] = {}


def run_spec(spec: ChunkSpec) -> ChunkResult:
    """Run a chunk from its plain-data description (in a worker process, or anywhere that reaches the database):
    the part is built from the config through the stage registry and found by its identity."""
    from autointerp.config import RunConfig, config_hash
    from autointerp.store import open_store
    from autointerp.store.queries import features_by_ids

    key = (spec.db, config_hash(spec.config), spec.stage, spec.identity)
    if key not in _PARTS:
        cfg = RunConfig.model_validate(spec.config)
        store = open_store(spec.db)
        parts = {p.identity: p for p in stage_class(spec.stage).build(cfg, store)}
        if spec.identity not in parts:
            raise RuntimeError(f"{spec.stage}: no part with identity {spec.identity} in this config "
                               f"(have {', '.join(parts) or 'none'}): the worker's code or config differs")  # fmt: skip
        _PARTS[key] = (parts[spec.identity], store)
    stage, store = _PARTS[key]
    feats = features_by_ids(store, list(spec.feature_ids))
    stage.prepare(feats)
    return stage.execute(feats, spec.run_id)
