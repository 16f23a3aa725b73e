"""`autointerp run`: the pipeline the config describes, for the selected features, as one job.

The job's parts are the stages it runs (jobs.loop.Job: each explainer the config names, the scorers, the causal
check), after the collection: one unit for the whole job, claimed like the others, so several workers started at
once collect once (the others wait for it) and a collection stopped halfway goes on from its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from autointerp.config import RunConfig, config_hash
from autointerp.jobs.loop import Job, JobError, JobResult, StopFlag
from autointerp.jobs.stage import COLLECT, PIPELINE
from autointerp.store.engine import Store
from autointerp.store.units import claim, count_open, ensure_unit, finish_units, release_units

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

    def __init__(self, cfg: RunConfig, store: Store, *, stages: Sequence[str] | None = None, **kw: Any) -> None:
        check_job(cfg, stages or cfg.run.stages or PIPELINE)
        super().__init__(cfg, store, stages=stages, **kw)

    def prelude(self) -> str | None:
        if COLLECT not in self.stages:
            return None
        return self._collect()

    def _collect(self) -> str | None:
        """Collect (resumable, idempotent) under the job's collection unit; another worker collecting makes this
        one wait. Returns a stop reason if the worker was stopped while waiting."""
        from autointerp.collect.run import run_collect
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
            time.sleep(self.cfg.run.poll_s)
