"""Run rows: one per execution of a stage, with its config, progress, counts and how it ended.

Collection finds its run by a config key (a rerun resumes it); the per-feature stages start a new run on every
execution (its id goes on every row it writes) and finish it as done, failed or interrupted.

Every run row names the process that runs it (`worker`, host:pid) and is stamped on every write (`heartbeat_at`):
a `running` row whose heartbeat has stopped belongs to a process that died.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from autointerp.store.engine import Store
from autointerp.store.tables import Run, utcnow

FINAL = ("done", "failed", "interrupted")


def worker_name() -> str:
    """This process, as run rows name it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def get_or_create_run(store: Store, stage: str, key: str, config: dict[str, Any], total: int) -> Run:
    """The run of `key`, started by this process: a new row, or an unfinished one taken over (status running
    again, this worker, a fresh heartbeat, the previous error cleared). A done run is returned as it is."""
    now = utcnow()
    with store.session() as s:
        run = s.exec(select(Run).where(Run.key == key)).first()
        if run is None:
            run = Run(stage=stage, key=key, config=config, total=total, worker=worker_name(), heartbeat_at=now)
        elif run.status != "done":
            run.status, run.worker, run.heartbeat_at = "running", worker_name(), now
            run.error, run.finished_at = None, None
        else:
            return run
        s.add(run)
        s.commit()
        s.refresh(run)
        return run


def set_run(store: Store, run_id: int, **values: Any) -> None:
    """Update columns of a run (stamping its heartbeat); a final status also stamps finished_at."""
    values.setdefault("heartbeat_at", utcnow())
    if values.get("status") in FINAL:
        values.setdefault("finished_at", values["heartbeat_at"])
    with store.session() as s:
        s.execute(update(Run).where(col(Run.id) == run_id).values(**values))
        s.commit()


def start_run(store: Store, stage: str, config: dict[str, Any], total: int) -> int:
    """A new run of a per-feature stage (its key is unique to this execution); returns its id."""
    run = get_or_create_run(store, stage, f"{stage}/{uuid.uuid4().hex}", config, total)
    assert run.id is not None
    return run.id


def update_run(store: Store, run_id: int, progress: int, counts: dict[str, Any]) -> None:
    set_run(store, run_id, progress=progress, counts=counts)


def finish_run(store: Store, run_id: int, status: str, counts: dict[str, Any], error: str | None = None) -> None:
    set_run(store, run_id, status=status, counts=counts, error=error)


def runs_of(store: Store, stage: str | None = None) -> list[Run]:
    """Runs, oldest first (of one stage, if given)."""
    q = select(Run).order_by(col(Run.id))
    if stage is not None:
        q = q.where(Run.stage == stage)
    with store.session() as s:
        return list(s.exec(q).all())


def workers_seen(store: Store, now: datetime) -> list[dict[str, Any]]:
    """Every worker named on a run row: its last heartbeat, whether it has a run still marked running, and its
    stages (newest heartbeat first)."""
    with store.session() as s:
        rows = s.exec(select(Run).where(col(Run.worker).is_not(None))).all()
    by: dict[str, dict[str, Any]] = {}
    for r in rows:
        w = by.setdefault(str(r.worker), {"worker": r.worker, "last": None, "running": False, "stages": set()})
        beat = r.heartbeat_at or r.started_at
        if beat is not None and beat.tzinfo is None:
            beat = beat.replace(tzinfo=now.tzinfo)
        if beat is not None and (w["last"] is None or beat > w["last"]):
            w["last"] = beat
        w["running"] = w["running"] or r.status == "running"
        w["stages"].add(r.stage)
    out = []
    for w in sorted(by.values(), key=lambda w: w["last"] or now, reverse=True):
        last = w["last"]
        out.append({"worker": w["worker"], "running": w["running"], "stages": sorted(w["stages"]),
                    "last_heartbeat": last.isoformat() if last else None,
                    "seconds_since_heartbeat": round((now - last).total_seconds(), 1) if last else None})  # fmt: skip
    return out


def throughput(store: Store) -> dict[str, float]:
    """Units per second of each stage over its finished runs that did some work (what a dry run's time is from)."""
    with store.session() as s:
        rows = s.exec(
            select(Run).where(col(Run.status) == "done", col(Run.finished_at).is_not(None), col(Run.progress) > 0)
        ).all()
    done: dict[str, tuple[int, float]] = {}
    for r in rows:
        assert r.finished_at is not None
        secs = (r.finished_at - r.started_at).total_seconds()
        if secs > 0:
            n, t = done.get(r.stage, (0, 0.0))
            done[r.stage] = (n + r.progress, t + secs)
    return {stage: n / t for stage, (n, t) in done.items() if t > 0}
