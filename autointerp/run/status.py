"""`autointerp status`: where the jobs on a database stand, read from the store alone (no torch, so it answers in
a moment, also while a job runs, from another terminal or machine).

Per stage: units done (by outcome: ok, failed, skipped), pending and in progress; the rate over the last minutes
and the time left at that rate; what the LLM calls cost so far (calls, tokens, dollars); the workers alive (a
heartbeat within three heartbeat intervals) and the ones that went silent; and the most common errors with their
counts. `--json` is stable: keys are only ever added.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from autointerp.jobs.stage import PIPELINE
from autointerp.store.engine import Store
from autointerp.store.llm_log import usage_summary
from autointerp.store.queries import common_errors
from autointerp.store.runs import workers_seen
from autointerp.store.tables import utcnow
from autointerp.store.units import done_since, unit_counts


@dataclass(frozen=True)
class StageStatus:
    stage: str
    done: int
    ok: int
    failed: int
    skipped: int
    pending: int
    in_progress: int
    per_minute: float  # units finished per minute over the window
    eta_s: float | None  # pending + in progress at that rate; None when nothing moved in the window


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
    counts = unit_counts(store)
    recent = done_since(store, now - timedelta(seconds=window_s))
    stages = []
    for stage in [s for s in PIPELINE if s in counts] + sorted(s for s in counts if s not in PIPELINE):
        c = counts[stage]
        ok, failed, skipped = c.get("ok", 0), c.get("failed", 0), c.get("skipped", 0)
        done = sum(n for k, n in c.items() if k not in ("pending", "in_progress"))
        left = c.get("pending", 0) + c.get("in_progress", 0)
        rate = recent.get(stage, 0) / (window_s / 60.0)
        eta = left / rate * 60.0 if rate > 0 else (0.0 if left == 0 else None)
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
    seen = workers_seen(store, now)
    workers = [w | {"alive": w["seconds_since_heartbeat"] is not None and w["seconds_since_heartbeat"] <= alive_s}
               for w in seen]  # fmt: skip
    return JobStatus(stages, spend, workers, common_errors(store, n_errors), window_s, now.isoformat())


def _by_stage(rows: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = out.setdefault(r.stage or "", {"calls": 0, "tokens": 0, "cost_usd": 0.0})
        d["calls"] += r.calls
        d["tokens"] += r.prompt_tokens + r.completion_tokens
        d["cost_usd"] = round(d["cost_usd"] + r.cost_usd, 6)
    return out


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def status_lines(st: JobStatus) -> list[str]:
    """The status as plain lines for a terminal or a log."""
    if not st.stages:
        return ["no job has run on this database yet (autointerp run starts one)"]
    lines = [f"{'stage':<10} {'done':>7} {'ok':>7} {'failed':>7} {'skipped':>7} {'pending':>8} {'running':>8}"
             f" {'per min':>8} {'ETA':>8}"]  # fmt: skip
    for s in st.stages:
        lines.append(f"{s.stage:<10} {s.done:>7} {s.ok:>7} {s.failed:>7} {s.skipped:>7} {s.pending:>8}"
                     f" {s.in_progress:>8} {s.per_minute:>8.2f} {_clock(s.eta_s):>8}")  # fmt: skip
    sp = st.spend
    lines.append(f"LLM: {sp['calls']} calls, {sp['prompt_tokens'] + sp['completion_tokens']:,} tokens, "
                 f"${sp['cost_usd']:.4f}")  # fmt: skip
    alive = [w for w in st.workers if w["alive"] and w["running"]]
    silent = [w for w in st.workers if w["running"] and not w["alive"]]
    lines.append(f"workers alive: {', '.join(w['worker'] for w in alive) or 'none'}"
                 + (f"; silent (dead?): {', '.join(w['worker'] for w in silent)}" if silent else ""))  # fmt: skip
    for e in st.errors:
        lines.append(f"  {e['count']:>5} x {e['where']}: {e['message']}")
    return lines
