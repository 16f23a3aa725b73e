"""The one work loop: every command that does per-feature work (explain, score, intervene, run) is a `Job`.

A worker first plans: it registers the pending and finished units of every part (idempotent, so every worker of a
job may plan). Then it claims units in short transactions, always from the latest part first, where a unit waits
until the feature's units of the earlier parts are finished: features flow through the stages, and a job stopped at
3 a.m. leaves many complete features rather than every feature explained and none scored. Claimed chunks go to an
executor (this process, or a pool of processes: jobs.executors); their results come back as plain data, and the
loop marks the units done, counts the spend and reports progress. One `Run` row per part and execution, its id on
every row written. A rerun of a finished job plans nothing pending and makes no LLM call and no forward pass.

Budgets count the whole job's LLM spend: every worker records its part's spend on its Run row after each chunk,
and reads the job's total (all workers, all invocations) before claiming. A job is identified by `job_id`: the
name given (`--job NAME`), else a hash of its parts (stage and identity: explainer, scorers, judge with their prompt
and config hashes) and its features; a new name starts a fresh budget.

Stops: a budget or deadline stops the claiming; the first Ctrl-C or SIGTERM (a StopFlag set by the CLI) lets the
units in flight finish, a second stops at once (KeyboardInterrupt) and gives them back. A killed worker's units are
claimed again once its lease expires (at once by a worker restarted with the same name, or by any worker on the same
host once the dead process is gone).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autointerp.config import RunConfig, config_hash
from autointerp.jobs.budget import Budget, Spend
from autointerp.jobs.executors import ChunkSpec, Executor, LocalExecutor
from autointerp.jobs.progress import Progress
from autointerp.jobs.stage import PIPELINE, STAGES, ChunkResult, Stage, Tally, stage_class, stage_names
from autointerp.store.engine import Store
from autointerp.store.llm_log import SPEND, job_spend
from autointerp.store.queries import select_features
from autointerp.store.runs import finish_run, set_run, start_run, worker_name
from autointerp.store.tables import utcnow
from autointerp.store.units import (
    Claimed,
    claim,
    count_open,
    expire_worker,
    finish_units,
    heartbeat,
    leased_workers,
    register_units,
    release_units,
)

if TYPE_CHECKING:
    from autointerp.store.tables import Feature


class JobError(ValueError):
    """A job that cannot start: an unknown stage, explainer or scorer; said before anything is written."""


@dataclass
class StopFlag:
    """Set by the first Ctrl-C / SIGTERM (the CLI's handler): no new unit is claimed."""

    reason: str | None = None


@dataclass
class Part:
    """A stage part as the loop runs it: the Stage, the parts it waits on, and this execution's bookkeeping."""

    stage: Stage
    requires: list[tuple[str, str]] = field(default_factory=list)
    run_id: int | None = None
    tally: Tally = field(default_factory=Tally)
    selected: int = 0
    pending: int = 0  # units not finished when this worker planned
    done: int = 0  # units this worker finished
    spent: Spend = field(default_factory=Spend)  # LLM spend of the chunks this worker finished

    @property
    def key(self) -> tuple[str, str]:
        return self.stage.name, self.stage.identity


@dataclass(frozen=True)
class PartResult:
    run_id: int | None
    selected: int
    pending: int
    done: int
    rows: dict[str, dict[str, int]]
    counters: dict[str, int]


@dataclass(frozen=True)
class JobResult:
    status: str  # done | budget | deadline | interrupted
    reason: str
    units_done: dict[str, int]  # part label -> units this worker finished
    pending: int  # units of the job not finished when this worker stopped
    spent: Spend
    seconds: float
    run_ids: dict[str, int]
    parts: dict[str, PartResult] = field(default_factory=dict)
    cache_hits: int = 0


def process_gone(worker: str) -> bool:
    """A worker named host:pid (the default name) of this host whose process no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists under another user
        return False
    return False


def build_parts(cfg: RunConfig, store: Store, stages: Sequence[str]) -> list[Stage]:
    """The parts the config asks for, of the per-feature stages among `stages`, in pipeline order."""
    return [p for name in stage_names(stages) if name in STAGES for p in stage_class(name).build(cfg, store)]


class Job:
    """The work loop over the parts of a job; the extension point for how work is run, not what it is.

    `parts` are built from the registry for the per-feature stages among `stages` (default run.stages) unless given
    (a library caller may hand in its own, e.g. with a scripted client). `features` defaults to the run's selection
    (run.features or explain.features, at most explain.limit). `executor` runs the claimed chunks (default: this
    process, one chunk at a time). Subclasses may run work before planning in `prelude` (run/job.py: collection).
    """

    def __init__(self, cfg: RunConfig, store: Store, *, stages: Sequence[str] | None = None,
                 parts: Sequence[Stage] | None = None, features: Sequence[Feature] | None = None,
                 budget: Budget | None = None, worker: str | None = None, progress: Progress | None = None,
                 stop: StopFlag | None = None, say: Callable[[str], None] | None = None,
                 executor: Executor | None = None, job: str | None = None) -> None:  # fmt: skip
        self.cfg, self.store = cfg, store
        self.stages = stage_names(stages or cfg.run.stages or PIPELINE)
        self._given_parts = list(parts) if parts is not None else None
        self.features: list[Feature] | None = list(features) if features is not None else None
        self.budget = budget or Budget()
        self.worker = worker or worker_name()
        self.progress, self.stop = progress, stop or StopFlag()
        self.say = say or (lambda _msg: None)
        self.executor = executor or LocalExecutor(store)
        self.parts: list[Part] = []
        self.spent = Spend()
        self.cache_hits = 0
        self._alive = threading.Event()
        self._config_data: dict[str, Any] = cfg.model_dump(mode="json")
        self._waiting_said = False
        self.job_name = job
        self.job_id = job or ""  # set by plan() when not named

    # -- hooks -----------------------------------------------------------------------------------------------

    def prelude(self) -> str | None:
        """Work before planning (under the heartbeat); returns a stop reason to end the job there."""
        return None

    # -- planning --------------------------------------------------------------------------------------------

    def plan(self) -> None:
        c = self.cfg
        since = utcnow()  # units another worker finishes while this one reads the rows stay finished
        if self.features is None:
            selector = c.run.features or c.explain.features
            self.features = select_features(self.store, selector, limit=c.explain.limit, seed=c.explain.seed)
        stages = self._given_parts if self._given_parts is not None else build_parts(c, self.store, self.stages)
        self.parts = [Part(s) for s in stages]
        upstream: set[int] = set()
        ids = [f.id for f in self.features if f.id is not None]
        for k, part in enumerate(self.parts):
            part.requires = [q.key for q in self.parts[:k]]
            # an earlier part's unfinished feature is unfinished here too: its rows are not final yet
            pending = part.stage.pending(self.features) | upstream
            name, ident = part.key
            todo, finished = [i for i in ids if i in pending], [i for i in ids if i not in pending]
            register_units(self.store, name, ident, todo, finished, since=since)
            part.selected, part.pending = len(ids), sum(i in pending for i in ids)
            upstream = pending
        if not self.job_name:
            self.job_id = "job-" + config_hash({"parts": sorted(p.key for p in self.parts), "features": sorted(ids)})

    # -- working ---------------------------------------------------------------------------------------------

    def run(self) -> JobResult:
        t0 = time.perf_counter()
        expire_worker(self.store, self.worker)  # this worker restarted: its old leases are free at once
        # the heartbeat renews every lease this worker holds, through the prelude too (it may outlast lease_s)
        beat = threading.Thread(target=self._beat, name="autointerp-heartbeat", daemon=True)
        beat.start()
        try:
            self.executor.start(self.stages)
            why = self.prelude()
            if why is not None:
                return self._result("interrupted", why, t0)
            self.plan()
            return self._work(t0)
        finally:
            self._alive.set()
            # joined, not left to die with the interpreter: a daemon thread still inside a database call while
            # the process exits can abort it ("terminate called without an active exception")
            beat.join(timeout=30)
            self.executor.close()

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
            conf = {"label": p.stage.label, "identity": p.stage.identity, "worker": self.worker, "job": self.job_id,
                    **p.stage.run_config()}  # fmt: skip
            p.run_id = start_run(self.store, p.stage.name, conf, total=p.pending)
            set_run(self.store, p.run_id, worker=self.worker)  # the job's worker name, as `status` shows it

    def _close_runs(self, status: str, error: str | None = None) -> None:
        for p in self.parts:
            if p.run_id is not None:
                finish_run(self.store, p.run_id, status, {**self._counts(p), "units": p.done}, error=error)

    def _next(self) -> tuple[Part, list[Claimed]] | None:
        for part in reversed(self.parts):  # the latest stage first: finish features before starting new ones
            name, ident = part.key
            got = claim(self.store, name, ident, self.worker, max(1, part.stage.chunk_size), self.cfg.run.lease_s,
                        requires=part.requires, run_id=part.run_id)  # fmt: skip
            if got:
                return part, got
        return None

    def _left(self, parts: Sequence[Part] | None = None) -> int:
        return count_open(self.store, [p.key for p in (self.parts if parts is None else parts)])

    def _counts(self, part: Part) -> dict[str, Any]:
        s = part.spent
        return {**part.tally.as_dict(), SPEND: {"calls": s.calls, "tokens": s.tokens, "usd": s.usd}}

    def job_spent(self) -> Spend:
        """The job's LLM spend so far: every worker's finished chunks, in this and earlier invocations."""
        got = job_spend(self.store, self.job_id, sorted({p.stage.name for p in self.parts}))
        return Spend(int(got["calls"]), int(got["tokens"]), got["usd"])

    def _stop_reason(self, in_flight: int) -> str | None:
        if self.stop.reason:
            return self.stop.reason
        b = self.budget
        capped = (b.max_usd, b.max_tokens, b.max_calls) != (None, None, None)
        return b.stop_reason(self.job_spent() if capped else self.spent, in_flight=in_flight)

    def _spec(self, part: Part, got: Sequence[Claimed]) -> ChunkSpec:
        assert part.run_id is not None
        name, ident = part.key
        return ChunkSpec(self._config_data, self.store.url, name, ident, part.run_id,
                         tuple(u.feature_id for u in got))  # fmt: skip

    def _finish(self, part: Part, got: Sequence[Claimed], res: ChunkResult) -> None:
        self.spent += res.spend
        part.spent += res.spend
        self.cache_hits += res.cache_hits
        self.budget.record_chunk(res.spend)
        part.tally.merge(res.rows, res.counters)
        finish_units(self.store, {u.id: res.outcomes.get(u.feature_id, "ok") for u in got}, self.worker)
        part.done += len(got)
        assert part.run_id is not None
        set_run(self.store, part.run_id, progress=part.done, counts=self._counts(part))
        if self.progress is not None:
            self.progress(part.stage.label, part.done, part.done + self._left([part]))

    def _wait_for_others(self) -> None:
        """Nothing claimable, yet units are open: other workers hold them, or they wait on the earlier parts.
        Leases of dead processes on this host are given back at once; the user is told once what is awaited."""
        freed = sum(expire_worker(self.store, w) for w in leased_workers(self.store) if process_gone(w))
        if freed:
            self.say(f"gave back {freed} units held by processes of this host that are gone")
            return
        if not self._waiting_said:
            self._waiting_said = True
            self.say(f"waiting for {self._left()} units held by other workers (a dead worker's units are free once "
                     f"its lease expires, at most {self.cfg.run.lease_s:.0f}s after its last heartbeat)")  # fmt: skip
        time.sleep(self.cfg.run.poll_s)

    def _work(self, t0: float) -> JobResult:
        self._open_runs()
        if self.progress is not None:  # each part's clock starts now, not when its first chunk is done
            for p in self.parts:
                if p.pending:
                    self.progress(p.stage.label, 0, p.pending)
        in_flight: dict[Future[ChunkResult], tuple[Part, list[Claimed]]] = {}
        submitting: list[Claimed] = []
        try:
            while True:
                why = self._stop_reason(len(in_flight))
                while why is None and len(in_flight) < self.executor.slots:
                    nxt = self._next()
                    if nxt is None:
                        break
                    part, submitting = nxt
                    fut = self.executor.submit(part.stage, self._spec(part, submitting))
                    in_flight[fut], submitting = (part, submitting), []
                    why = self._stop_reason(len(in_flight))
                if not in_flight:
                    if why is not None:
                        status = "interrupted" if self.stop.reason else why.split(":", 1)[0]
                        self._close_runs("interrupted" if status == "interrupted" else "done")
                        return self._result(status, why, t0)
                    if self._left() == 0:
                        break
                    self._wait_for_others()
                    continue
                finished, _ = wait(in_flight, timeout=max(1.0, self.cfg.run.poll_s), return_when=FIRST_COMPLETED)
                for fut in finished:
                    part, got = in_flight.pop(fut)
                    self._finish(part, got, fut.result())
            assert self.features is not None
            for part in self.parts:  # features finished before this run get verdicts from the latest scores
                assert part.run_id is not None
                part.stage.after(self.features, part.run_id, part.tally)
        except BaseException as exc:
            # stopped at once or failed: the units in flight go back (their rows, if written, make them finished
            # when planned again)
            self.executor.cancel()
            held = [u.id for _p, got in in_flight.values() for u in got] + [u.id for u in submitting]
            release_units(self.store, held, self.worker)
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._close_runs("interrupted" if interrupted else "failed", f"{type(exc).__name__}: {exc}")
            raise
        self._close_runs("done")
        return self._result("done", "every unit is finished", t0)

    def _result(self, status: str, reason: str, t0: float) -> JobResult:
        parts = {p.stage.label: PartResult(p.run_id, p.selected, p.pending, p.done, p.tally.as_dict(),
                                           dict(p.tally.counters)) for p in self.parts}  # fmt: skip
        return JobResult(status, reason, {p.stage.label: p.done for p in self.parts},
                         self._left() if self.parts else 0, self.spent, time.perf_counter() - t0,
                         {p.stage.label: p.run_id for p in self.parts if p.run_id is not None}, parts,
                         self.cache_hits)  # fmt: skip
