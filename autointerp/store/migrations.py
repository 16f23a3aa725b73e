"""Schema migrations: one function per version step. Version 1 is the first schema, so none exist yet."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from autointerp.store.tables import SchemaVersion, utcnow

# MIGRATIONS[v] upgrades a database from version v to v + 1.
MIGRATIONS: dict[int, Callable[[Engine], None]] = {}


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
