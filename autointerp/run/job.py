"""`autointerp run`: the pipeline the config describes, for the selected features, as one job.

The job's parts are the stages it runs (jobs.loop.Job: each explainer the config names, the scorers, the causal
check), after the collection: one unit for the whole job, claimed like the others, so several workers started at
once collect once (the others wait for it) and a collection stopped halfway goes on from its checkpoint.

With several shards (`--shards N`, or by default one per slot of a process pool or Ray cluster), the worker that
holds the collection unit is its driver: the shards are units of their own (stage collect-shard), run by the
job's executor as plain-data tasks; each stores its sampler state, and the driver merges them into exactly what
one pass writes (collect.shards.collect_sharded). A driver that dies resumes with the stored shards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING, Any

from autointerp.config import RunConfig, config_hash
from autointerp.jobs.loop import Job, JobError, JobResult, StopFlag, process_gone
from autointerp.jobs.stage import COLLECT, COLLECT_SHARD, PIPELINE
from autointerp.store.engine import Store
from autointerp.store.units import (
    Claimed,
    claim,
    count_open,
    ensure_unit,
    expire_worker,
    finish_units,
    leased_workers,
    register_units,
    release_units,
)

if TYPE_CHECKING:
    from autointerp.collect.shards import ShardPlan

__all__ = ["COLLECT_FEATURE", "JobError", "JobResult", "PipelineJob", "StopFlag", "check_job"]

COLLECT_FEATURE = 0  # the feature id of the job's one collection unit


def check_job(cfg: RunConfig, stages: Sequence[str]) -> None:
    """Refuse a job the config cannot describe (a stage, explainer or scorer that does not exist): called before
    the database is opened, so that nothing is written."""
    from autointerp.explain.explainers import EXPLAINERS
    from autointerp.score.scorers import SCORERS

    bad = [s for s in stages if s not in PIPELINE]
    if bad:
        raise JobError(f"unknown stage {bad[0]!r}: choose from {', '.join(PIPELINE)}")
    for name in cfg.run.explainers:
        if name not in EXPLAINERS:
            raise JobError(f"unknown explainer {name!r} in run.explainers: choose from {', '.join(EXPLAINERS)}")
    for m in cfg.score.methods:
        if m not in SCORERS:
            raise JobError(f"unknown scorer {m!r} in score.methods: choose from {', '.join(SCORERS)}")
    if "intervene" in stages and cfg.intervene.explainer not in (None, *cfg.run.explainers):
        raise JobError(f"intervene.explainer {cfg.intervene.explainer!r} is not among run.explainers")


class PipelineJob(Job):
    """The job of `autointerp run`: collection first (when among its stages), then the per-feature stages."""

    def __init__(self, cfg: RunConfig, store: Store, *, stages: Sequence[str] | None = None,
                 shards: int | None = None, **kw: Any) -> None:  # fmt: skip
        check_job(cfg, stages or cfg.run.stages or PIPELINE)
        if shards is not None and shards < 1:
            raise JobError(f"--shards must be at least 1, got {shards}")
        super().__init__(cfg, store, stages=stages, **kw)
        # one pass unless asked, or unless the executor runs several tasks side by side
        self.shards = shards if shards is not None else self.executor.slots
        self.shard_log: list[dict[str, Any]] = []  # what each shard this driver ran returned

    def prelude(self) -> str | None:
        if COLLECT not in self.stages:
            return None
        return self._collect()

    def _collect(self) -> str | None:
        """Collect (resumable, idempotent) under the job's collection unit; another worker collecting makes this
        one wait. Returns a stop reason if the worker was stopped while waiting."""
        from autointerp.collect.run import run_collect
        from autointerp.collect.shards import collect_sharded
        from autointerp.collect.train_sae import train_missing_saes

        c = self.cfg
        ident = config_hash({"model": c.model.model_dump(), "corpus": c.corpus.model_dump(),
                             "collect": c.collect.model_dump()})  # fmt: skip
        ensure_unit(self.store, COLLECT, ident, COLLECT_FEATURE)
        while True:
            got = claim(self.store, COLLECT, ident, self.worker, 1, self.cfg.run.lease_s)
            if got:
                try:
                    train_missing_saes(self.cfg, self.store, progress=self.progress, say=self.say)
                    if self.shards > 1:
                        if collect_sharded(self.cfg, self.store, self.shards, self._run_shards,
                                           progress=self.progress) is None:  # fmt: skip
                            release_units(self.store, [got[0].id], self.worker)
                            return self.stop.reason or "stopped"
                    else:
                        run_collect(self.cfg, self.store, progress=self.progress)
                except BaseException:
                    # stopped or failed: the checkpoint keeps what was collected, another worker goes on from it
                    release_units(self.store, [got[0].id], self.worker)
                    raise
                finish_units(self.store, {got[0].id: "ok"}, self.worker)
                return None
            if count_open(self.store, [(COLLECT, ident)]) == 0:
                return None  # collected before: nothing to do
            if self.stop.reason:
                return self.stop.reason
            if not self._free_gone():  # a driver killed before (kill -9): its units are free at once
                time.sleep(self.cfg.run.poll_s)

    def _run_shards(self, plan: ShardPlan) -> bool:
        """Get every shard of `plan` collected through the job's executor, as units under leases (a shard whose state
        is stored is finished); False when stopped first (the shards in flight finish, the rest stay pending)."""
        ident = plan.identity
        register_units(self.store, COLLECT_SHARD, ident, [i for i in range(plan.n) if i not in plan.stored],
                       list(plan.stored))  # fmt: skip
        in_flight: dict[Future[dict[str, Any]], Claimed] = {}
        done = len(plan.stored)
        if self.progress is not None:
            self.progress("collect shards", done, plan.n)
        try:
            while True:
                while self.stop.reason is None and len(in_flight) < self.executor.slots:
                    got = claim(self.store, COLLECT_SHARD, ident, self.worker, 1, self.cfg.run.lease_s)
                    if not got:
                        break
                    in_flight[self.executor.call(COLLECT_SHARD, plan.payload(got[0].feature_id))] = got[0]
                if not in_flight:
                    if self.stop.reason is not None:
                        return False
                    if count_open(self.store, [(COLLECT_SHARD, ident)]) == 0:
                        return True
                    if not self._free_gone():
                        time.sleep(self.cfg.run.poll_s)
                    continue
                finished, _ = wait(in_flight, timeout=max(1.0, self.cfg.run.poll_s), return_when=FIRST_COMPLETED)
                for fut in finished:
                    unit = in_flight.pop(fut)
                    self.shard_log.append(fut.result())  # a shard that failed (after the engine's retries) fails
                    finish_units(self.store, {unit.id: "ok"}, self.worker)
                    done += 1
                    if self.progress is not None:
                        self.progress("collect shards", done, plan.n)
        except BaseException:
            self.executor.cancel()
            release_units(self.store, [u.id for u in in_flight.values()], self.worker)
            raise

    def _free_gone(self) -> int:
        """Give back the units held by processes of this host that are gone; how many."""
        return sum(expire_worker(self.store, w) for w in leased_workers(self.store)
                   if w != self.worker and process_gone(w))  # fmt: skip
