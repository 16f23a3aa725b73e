"""`autointerp status`: where the jobs on a database stand, read from the store alone (no torch, so it answers in
a moment, also while a job runs, from another terminal or machine).

Per stage: units done (by outcome: ok, failed, skipped), pending and in progress; the rate of the last minutes
and the time left at that rate; what the LLM calls cost so far (calls, tokens, dollars); the workers alive (a
heartbeat within three heartbeat intervals, of a run row or of the leases it holds) and the ones that went silent;
and the most common errors with their counts. `--json` is stable: keys are only ever added.

The rate is the units finished in the window over the time the stage's runs were at work in it (the union of
their spans, start to finish or to the last heartbeat), not over the whole window: a job that took 20 s of the
last 10 minutes ran at its own pace, and its ETA is not thirty times too long. No ETA when nothing is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from autointerp.jobs.stage import PIPELINE
from autointerp.store.engine import Store
from autointerp.store.llm_log import usage_summary
from autointerp.store.queries import common_errors
from autointerp.store.runs import runs_of, workers_seen
from autointerp.store.tables import Run, utcnow
from autointerp.store.units import done_since, lease_heartbeats, unit_counts


@dataclass(frozen=True)
class StageStatus:
    stage: str
    done: int
    ok: int
    failed: int
    skipped: int
    pending: int
    in_progress: int
    per_minute: float  # units finished in the window per minute of the stage's runs at work in it
    eta_s: float | None  # pending + in progress at that rate; None when nothing moved, or nothing is left


@dataclass(frozen=True)
class JobStatus:
    stages: list[StageStatus]
    spend: dict[str, Any]
    workers: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    window_s: float
    at: str
    schema: int = 1  # of this JSON document

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_status(store: Store, *, window_s: float = 600.0, alive_s: float = 90.0, n_errors: int = 5) -> JobStatus:
    now = utcnow()
    since = now - timedelta(seconds=window_s)
    counts = unit_counts(store)
    recent = done_since(store, since)
    runs = runs_of(store) if recent else []
    stages = []
    for stage in [s for s in PIPELINE if s in counts] + sorted(s for s in counts if s not in PIPELINE):
        c = counts[stage]
        ok, failed, skipped = c.get("ok", 0), c.get("failed", 0), c.get("skipped", 0)
        done = sum(n for k, n in c.items() if k not in ("pending", "in_progress"))
        left = c.get("pending", 0) + c.get("in_progress", 0)
        n = recent.get(stage, 0)
        rate = n / (max(1.0, busy_seconds(runs, stage, since, now, alive_s) or window_s) / 60.0) if n else 0.0
        eta = left / rate * 60.0 if rate > 0 and left > 0 else None
        stages.append(StageStatus(stage, done, ok, failed, skipped, c.get("pending", 0), c.get("in_progress", 0),
                                  round(rate, 3), None if eta is None else round(eta, 1)))  # fmt: skip
    rows = usage_summary(store)
    spend = {
        "calls": sum(r.calls for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "cost_usd": round(sum(r.cost_usd for r in rows), 6),
        "by_stage": _by_stage(rows),
    }
    workers = _workers(store, now, alive_s)
    return JobStatus(stages, spend, workers, common_errors(store, n_errors), window_s, now.isoformat())


def _aware(t: datetime, now: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=now.tzinfo)


def busy_seconds(runs: Sequence[Run], stage: str, since: datetime, now: datetime, alive_s: float) -> float:
    """Seconds between `since` and `now` during which some run of `stage` was at work: the union of the runs'
    spans, from their start to their finish (a running one: to now while its heartbeat is fresh, else to its last
    heartbeat)."""
    spans = []
    for r in runs:
        if r.stage != stage:
            continue
        start = _aware(r.started_at, now)
        beat = _aware(r.heartbeat_at or r.started_at, now)
        if r.finished_at is not None:
            end = _aware(r.finished_at, now)
        else:
            end = now if r.status == "running" and (now - beat).total_seconds() <= alive_s else beat
        start, end = max(start, since), min(end, now)
        if end > start:
            spans.append((start, end))
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is not None and start < reach:
            start = reach
        if end > start:
            total += (end - start).total_seconds()
            reach = end
    return total


def _workers(store: Store, now: datetime, alive_s: float) -> list[dict[str, Any]]:
    """The workers of the run rows, alive when a run row or a lease they hold was stamped within `alive_s`: a
    worker finishing the units it holds after a first Ctrl-C or SIGTERM has closed its runs, but its heartbeat
    still renews those leases. Such a worker counts as running."""
    leases = {w: _aware(t, now) for w, t in lease_heartbeats(store).items()}
    out = []
    for w in workers_seen(store, now):
        since = w["seconds_since_heartbeat"]
        beat = leases.get(str(w["worker"]))
        lease_since = (now - beat).total_seconds() if beat is not None else None
        alive = any(x is not None and x <= alive_s for x in (since, lease_since))
        out.append(w | {"alive": alive, "running": w["running"] or lease_since is not None})
    return out


def _by_stage(rows: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = out.setdefault(r.stage or "", {"calls": 0, "tokens": 0, "cost_usd": 0.0})
        d["calls"] += r.calls
        d["tokens"] += r.prompt_tokens + r.completion_tokens
        d["cost_usd"] = round(d["cost_usd"] + r.cost_usd, 6)
    return out
