"""Run rows: one per execution of a stage, with its config, progress, counts and how it ended.

Collection finds its run by a config key (a rerun resumes it); the per-feature stages start a new run on every
execution (its id goes on every row it writes) and finish it as done, failed or interrupted.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import update
from sqlmodel import col, select

from autointerp.store.engine import Store
from autointerp.store.tables import Run, utcnow

FINAL = ("done", "failed", "interrupted")


def get_or_create_run(store: Store, stage: str, key: str, config: dict[str, Any], total: int) -> Run:
    with store.session() as s:
        run = s.exec(select(Run).where(Run.key == key)).first()
        if run is None:
            run = Run(stage=stage, key=key, config=config, total=total)
            s.add(run)
            s.commit()
            s.refresh(run)
        return run


def set_run(store: Store, run_id: int, **values: Any) -> None:
    """Update columns of a run; a final status also stamps finished_at."""
    if values.get("status") in FINAL:
        values.setdefault("finished_at", utcnow())
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
