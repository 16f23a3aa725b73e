"""Schema migrations: one function per version step. `open_store` creates missing tables before migrating."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from autointerp.store.tables import SchemaVersion, utcnow


# MIGRATIONS[v] upgrades a database from version v to v + 1.
def _v1_add_llm_tables(engine: Engine) -> None:  # noqa: ARG001
    """Version 2 only added tables (llm_cache, llm_call, explanation), which create_all has made already."""


def _v2_add_score_table(engine: Engine) -> None:  # noqa: ARG001
    """Version 3 only added the score table, which create_all has made already."""


def _v3_add_intervention_tables(engine: Engine) -> None:  # noqa: ARG001
    """Version 4 only added tables (intervention, verdict), which create_all has made already."""


MIGRATIONS: dict[int, Callable[[Engine], None]] = {
    1: _v1_add_llm_tables,
    2: _v2_add_score_table,
    3: _v3_add_intervention_tables,
}


def migrate(engine: Engine, current: int, target: int) -> None:
    for v in range(current, target):
        step = MIGRATIONS.get(v)
        if step is None:
            raise RuntimeError(f"no migration from schema version {v} to {v + 1}")
        step(engine)
        with Session(engine) as s:
            row = s.exec(select(SchemaVersion)).one()
            row.version = v + 1
            row.updated_at = utcnow()
            s.add(row)
            s.commit()
