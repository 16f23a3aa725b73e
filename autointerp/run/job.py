"""`autointerp run`: the pipeline the config describes, for the selected features, as one job.

The job's parts are the stages it runs: each explainer the config names, the scorers, the causal check. Every
part has its units (a feature for one identity) in the store (store.units). A worker first plans: it registers
the pending and finished units of every part (idempotent, so every worker of a job may plan). Then it claims
units in short transactions, always from the latest stage first, where a unit waits until the feature's units of
the earlier parts are finished: features flow through the stages, and a job stopped at 3 a.m. leaves many
complete features rather than every feature explained and none scored. A rerun of a finished job plans nothing
pending and makes no LLM call and no forward pass.

Stops: a budget or deadline (run.budget) stops the claiming; the first Ctrl-C or SIGTERM lets the units in flight
finish (within `run.grace_s`), the second stops at once and gives them back. A killed worker's units are claimed
again once its lease expires (at once by a worker restarted with the same --worker-name).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autointerp.config import RunConfig, config_hash
from autointerp.jobs import Progress, Stage, Tally, make_client
from autointerp.run.budget import Budget, Spend
from autointerp.store.engine import Store
from autointerp.store.queries import features_by_ids, select_features
from autointerp.store.runs import finish_run, set_run, start_run, worker_name
from autointerp.store.tables import Feature, utcnow
from autointerp.store.units import (
    claim,
    count_open,
    ensure_unit,
    expire_worker,
    finish_units,
    heartbeat,
    register_units,
    release_units,
)

COLLECT_FEATURE = 0  # the feature id of the job's one collection unit


class JobError(ValueError):
    """A job that cannot start: an unknown stage, explainer or scorer; said before anything is written."""


@dataclass
class Part:
    """One stage of the job for one identity, with the Stage object that does its units."""

    stage: str  # the unit stage: explain | score | intervene
    label: str  # explain:llm, explain:tokens, score, intervene
    identity: str
    impl: Stage[Feature]
    requires: list[tuple[str, str]] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    run_id: int | None = None
    tally: Tally = field(default_factory=Tally)
    done: int = 0


@dataclass
class StopFlag:
    """Set by the first Ctrl-C / SIGTERM (the CLI's handler): no new unit is claimed."""

    reason: str | None = None


@dataclass(frozen=True)
class JobResult:
    status: str  # done | budget | deadline | interrupted
    reason: str
    units_done: dict[str, int]  # part label -> units this worker finished
    pending: int  # units of the job not finished when this worker stopped
    spent: Spend
    seconds: float
    run_ids: dict[str, int]


def check_job(cfg: RunConfig, stages: Sequence[str]) -> None:
    """Refuse a job the config cannot describe (a stage, explainer or scorer that does not exist): called before
    the database is opened, so that nothing is written."""
    from autointerp.explain.explainers import EXPLAINERS
    from autointerp.score.scorers import SCORERS

    known = ("collect", "explain", "score", "intervene")
    bad = [s for s in stages if s not in known]
    if bad:
        raise JobError(f"unknown stage {bad[0]!r}: choose from {', '.join(known)}")
    for name in cfg.run.explainers:
        if name not in EXPLAINERS:
            raise JobError(f"unknown explainer {name!r} in run.explainers: choose from {', '.join(EXPLAINERS)}")
    for m in cfg.score.methods:
        if m not in SCORERS:
            raise JobError(f"unknown scorer {m!r} in score.methods: choose from {', '.join(SCORERS)}")
    if "intervene" in stages and cfg.intervene.explainer not in (None, *cfg.run.explainers):
        raise JobError(f"intervene.explainer {cfg.intervene.explainer!r} is not among run.explainers")


def build_parts(cfg: RunConfig, store: Store, stages: Sequence[str], features: Sequence[Feature]) -> list[Part]:
    """The job's parts in pipeline order, each requiring the parts before it."""
    parts: list[Part] = []
    if "explain" in stages:
        from autointerp.explain.run import ExplainStage, build_explainer

        for name in cfg.run.explainers:
            ex = build_explainer(cfg, store, kind=name)
            client = getattr(ex, "client", None)
            ident = config_hash(ex.identity.key())
            impl = ExplainStage(cfg, store, ex)
            parts.append(Part("explain", f"explain:{name}", ident, impl, clients=[client] if client else []))
    if "score" in stages:
        from autointerp.score.run import ScoreStage, _clients, build_scorers

        scorers = build_scorers(cfg, store)
        ident = config_hash({sc.method: sc.identity.key() for sc in scorers})
        parts.append(Part("score", "score", ident, ScoreStage(cfg, store, scorers), clients=_clients(scorers)))
    if "intervene" in stages:
        from autointerp.intervene.measure import Measurer
        from autointerp.intervene.run import InterveneStage

        client = make_client(cfg, store, cfg.intervene.llm, stage="intervene")
        iv = InterveneStage(cfg, store, client, Measurer(cfg, store), features=features)
        i = iv.ident
        ident = config_hash({"intervention": i.intervention_hash, "score": i.score_hash, "verdict": i.verdict_hash})
        parts.append(Part("intervene", "intervene", ident, iv, clients=[client]))
    for k, p in enumerate(parts):
        p.requires = [(q.stage, q.identity) for q in parts[:k]]
    return parts


def _pending(part: Part, features: Sequence[Feature], upstream: set[int]) -> set[int]:
    """Feature ids a part still has to do: those its stage counts as unfinished, and those an earlier part still
    has to do (their explanations or scores are not final yet, so neither is this part's work on them)."""
    impl: Any = part.impl
    if part.stage == "explain":
        own = {f.id for f in impl.pending(features)}
    elif part.stage == "score":
        impl.load(features)
        own = {f.id for f in features if impl.unfinished(f)}
    else:
        impl.load(features, explanations=True)
        own = {f.id for f in features if impl.unfinished(f)}
    return {i for i in own if i is not None} | upstream


class Job:
    def __init__(self, cfg: RunConfig, store: Store, *, stages: Sequence[str] | None = None,
                 selector: str | None = None, budget: Budget | None = None, worker: str | None = None,
                 progress: Progress | None = None, stop: StopFlag | None = None,
                 say: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.cfg, self.store = cfg, store
        self.stages = [s for s in ("collect", "explain", "score", "intervene") if s in (stages or cfg.run.stages)]
        check_job(cfg, stages or cfg.run.stages)
        self.selector = selector or cfg.run.features or cfg.explain.features
        self.budget = budget or Budget()
        self.worker = worker or worker_name()
        self.progress, self.stop = progress, stop or StopFlag()
        self.say = say or (lambda _msg: None)
        self.parts: list[Part] = []
        self.features: list[Feature] = []
        self._alive = threading.Event()

    # -- the collection: one unit for the whole job ---------------------------------------------------------

    def _collect(self) -> str | None:
        """Collect (resumable, idempotent) under the job's collection unit; another worker collecting makes this
        one wait. Returns a stop reason if the worker was stopped while waiting."""
        from autointerp.collect.run import run_collect
        from autointerp.collect.train_sae import train_missing_saes

        c = self.cfg
        ident = config_hash({"model": c.model.model_dump(), "corpus": c.corpus.model_dump(),
                             "collect": c.collect.model_dump()})  # fmt: skip
        ensure_unit(self.store, "collect", ident, COLLECT_FEATURE)
        while True:
            got = claim(self.store, "collect", ident, self.worker, 1, self.cfg.run.lease_s)
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
            if count_open(self.store, [("collect", ident)]) == 0:
                return None  # collected before: nothing to do
            if self.stop.reason:
                return self.stop.reason
            time.sleep(self.cfg.run.poll_s)

    # -- planning --------------------------------------------------------------------------------------------

    def plan(self) -> None:
        c = self.cfg
        since = utcnow()  # units another worker finishes while this one reads the rows stay finished
        self.features = select_features(self.store, self.selector, limit=c.explain.limit, seed=c.explain.seed)
        self.parts = build_parts(c, self.store, self.stages, self.features)
        upstream: set[int] = set()
        ids = [f.id for f in self.features if f.id is not None]
        for part in self.parts:
            pending = _pending(part, self.features, upstream)
            register_units(self.store, part.stage, part.identity, [i for i in ids if i in pending],
                           [i for i in ids if i not in pending], since=since)  # fmt: skip
            upstream = pending

    # -- working ---------------------------------------------------------------------------------------------

    def spent(self) -> Spend:
        clients = {id(cl): cl for p in self.parts for cl in p.clients}.values()
        return sum((Spend(cl.calls, cl.prompt_tokens + cl.completion_tokens, cl.cost_usd) for cl in clients), Spend())

    def _beat(self) -> None:
        """Renew this worker's leases and stamp its runs (what `status` reads as alive), while a chunk runs too."""
        while not self._alive.wait(self.cfg.run.heartbeat_s):
            try:
                heartbeat(self.store, self.worker, self.cfg.run.lease_s)
                for p in self.parts:
                    if p.run_id is not None:
                        set_run(self.store, p.run_id)
            except Exception as exc:  # noqa: BLE001 (a busy or lost database: try again at the next beat)
                self.say(f"heartbeat failed ({type(exc).__name__}: {str(exc)[:120]}); trying again")

    def _open_runs(self) -> None:
        for p in self.parts:
            conf = {"label": p.label, "identity": p.identity, "worker": self.worker, **p.impl.run_config()}
            p.run_id = start_run(self.store, p.stage, conf, total=0)
            set_run(self.store, p.run_id, worker=self.worker)  # the job's worker name, as `status` shows it

    def _close_runs(self, status: str, error: str | None = None) -> None:
        for p in self.parts:
            if p.run_id is not None:
                finish_run(self.store, p.run_id, status, {**p.tally.as_dict(), "units": p.done}, error=error)

    def _next(self) -> tuple[Part, list[Any]] | None:
        for part in reversed(self.parts):  # the latest stage first: finish features before starting new ones
            got = claim(self.store, part.stage, part.identity, self.worker, max(1, part.impl.chunk_size),
                        self.cfg.run.lease_s, requires=part.requires, run_id=part.run_id)  # fmt: skip
            if got:
                return part, got
        return None

    def _left(self, parts: Sequence[Part] | None = None) -> int:
        return count_open(self.store, [(p.stage, p.identity) for p in (self.parts if parts is None else parts)])

    def _run_chunk(self, part: Part, got: list[Any]) -> None:
        feats = features_by_ids(self.store, [u.feature_id for u in got])
        impl: Any = part.impl
        if part.stage == "score":
            impl.load(feats)
        elif part.stage == "intervene":
            impl.load(feats, explanations=True)
        before = self.spent()
        assert part.run_id is not None
        outcomes = impl.run_chunk(feats, part.run_id, part.tally)
        self.budget.record_chunk(self.spent() - before)
        finish_units(self.store, {u.id: outcomes.get(u.feature_id, "ok") for u in got}, self.worker)
        part.done += len(got)
        set_run(self.store, part.run_id, progress=part.done, counts=part.tally.as_dict())
        if self.progress is not None:
            self.progress(part.label, part.done, part.done + self._left([part]))

    def run(self) -> JobResult:
        t0 = time.perf_counter()
        expire_worker(self.store, self.worker)  # this worker restarted: its old leases are free at once
        # the heartbeat renews every lease this worker holds, the collection's too (it may outlast lease_s)
        beat = threading.Thread(target=self._beat, name="autointerp-heartbeat", daemon=True)
        beat.start()
        try:
            return self._work(t0)
        finally:
            self._alive.set()
            # joined, not left to die with the interpreter: a daemon thread still inside a database call while
            # the process exits can abort it ("terminate called without an active exception")
            beat.join(timeout=30)

    def _work(self, t0: float) -> JobResult:
        if "collect" in self.stages:
            why = self._collect()
            if why is not None:
                return self._result("interrupted", why, t0)
        self.plan()
        self._open_runs()
        got: list[Any] = []
        try:
            while True:
                why = self.stop.reason or self.budget.stop_reason(self.spent())
                if why is not None:
                    status = "interrupted" if self.stop.reason else why.split(":", 1)[0]
                    self._close_runs("interrupted" if status == "interrupted" else "done")
                    return self._result(status, why, t0)
                nxt = self._next()
                if nxt is None:
                    if self._left() == 0:
                        break
                    time.sleep(self.cfg.run.poll_s)  # the rest is held by other workers, or waits on them
                    continue
                part, got = nxt
                self._run_chunk(part, got)
                got = []
            for part in self.parts:  # features finished before this run get verdicts from the latest scores
                assert part.run_id is not None
                if part.stage == "intervene":
                    part.impl.load(self.features, explanations=True)  # type: ignore[attr-defined]
                part.impl.after(self.features, part.run_id, part.tally)
        except BaseException as exc:
            release_units(self.store, [u.id for u in got], self.worker)  # stopped at once: give them back
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._close_runs("interrupted" if interrupted else "failed", f"{type(exc).__name__}: {exc}")
            raise
        self._close_runs("done")
        return self._result("done", "every unit is finished", t0)

    def _result(self, status: str, reason: str, t0: float) -> JobResult:
        return JobResult(status, reason, {p.label: p.done for p in self.parts}, self._left() if self.parts else 0,
                         self.spent(), time.perf_counter() - t0,
                         {p.label: p.run_id for p in self.parts if p.run_id is not None})  # fmt: skip
