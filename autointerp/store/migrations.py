"""Schema migrations: one function per version step, run in the transaction that records the new version.

`open_store` creates missing tables (create_all) before migrating, so a step that only adds tables has nothing to
do. A step that changes a table writes portable DDL: plain `ALTER TABLE ... ADD COLUMN` of a nullable column
without a default, which SQLite and PostgreSQL both run in place; a type that only PostgreSQL enforces (an integer
made a bigint) is changed there alone. Steps look at the live schema before changing it, so a step is never
applied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, inspect, select, text, update
from sqlalchemy.engine import Connection, Dialect, Engine

from autointerp.store.dialect import dialect_of
from autointerp.store.tables import Feature, Run, SchemaVersion, utcnow


def add_column_sql(column: Column[Any], dialect: Dialect) -> str:
    """`ALTER TABLE t ADD COLUMN c TYPE` for a column of a table model, in the dialect's quoting and types."""
    prep = dialect.identifier_preparer
    return (
        f"ALTER TABLE {prep.format_table(column.table)} ADD COLUMN {prep.format_column(column)} "
        f"{column.type.compile(dialect=dialect)}"
    )


def add_missing_columns(conn: Connection, table: Any, names: tuple[str, ...]) -> list[str]:
    """Add those of `names` (nullable columns of `table`) that the database's table lacks; returns them."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    added = [n for n in names if n not in have]
    for name in added:
        conn.execute(text(add_column_sql(table.c[name], conn.dialect)))
    return added


# MIGRATIONS[v] upgrades a database from version v to v + 1.
def _v1_add_llm_tables(conn: Connection) -> None:  # noqa: ARG001
    """Version 2 only added tables (llm_cache, llm_call, explanation), which create_all has made already."""


def _v2_add_score_table(conn: Connection) -> None:  # noqa: ARG001
    """Version 3 only added the score table, which create_all has made already."""


def _v3_add_intervention_tables(conn: Connection) -> None:  # noqa: ARG001
    """Version 4 only added tables (intervention, verdict), which create_all has made already."""


def _v4_add_run_worker(conn: Connection) -> None:
    """Version 5 added run.worker (host:pid) and run.heartbeat_at, and the unit table (made by create_all): the
    job runner's workers, heartbeats, units and leases."""
    add_missing_columns(conn, Run.__table__, ("worker", "heartbeat_at"))  # type: ignore[attr-defined]


def widen_columns(conn: Connection, table: Any, names: tuple[str, ...]) -> list[str]:
    """Give those of `names` whose type in the database is narrower than the table model's (an integer column the
    model makes a bigint) the model's type; returns them. PostgreSQL only: SQLite's integers are all 64-bit, and
    it has no ALTER COLUMN. The query views go first (PostgreSQL refuses to change a column a view reads);
    `open_store` makes them again after the migration."""
    if not dialect_of(conn).postgresql:
        return []
    from autointerp.store.views import drop_query_views

    have = {c["name"]: c["type"] for c in inspect(conn).get_columns(table.name)}
    prep = conn.dialect.identifier_preparer
    changed: list[str] = []
    for name in names:
        column = table.c[name]
        want = column.type.compile(dialect=conn.dialect)
        if have[name].compile(dialect=conn.dialect) != want:
            if not changed:
                drop_query_views(conn)
            conn.execute(
                text(f"ALTER TABLE {prep.format_table(table)} ALTER COLUMN {prep.format_column(column)} TYPE {want}")
            )
            changed.append(name)
    return changed


def _v5_checkpoints_in_the_database(conn: Connection) -> None:
    """Version 6 added the checkpoint table (a collection's checkpoint in the database, made by create_all) and made
    feature.n_tokens a bigint: on PostgreSQL its integer overflowed past 2**31 tokens (the table is rewritten, a
    second per ~100k features). A collection interrupted before the upgrade keeps its checkpoint file, which the
    collector still resumes from."""
    widen_columns(conn, Feature.__table__, ("n_tokens",))  # type: ignore[attr-defined]


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _v1_add_llm_tables,
    2: _v2_add_score_table,
    3: _v3_add_intervention_tables,
    4: _v4_add_run_worker,
    5: _v5_checkpoints_in_the_database,
}


def migrate(engine: Engine, current: int, target: int) -> None:
    table = SchemaVersion.__table__  # type: ignore[attr-defined]
    for v in range(current, target):
        step = MIGRATIONS.get(v)
        if step is None:
            raise RuntimeError(f"no migration from schema version {v} to {v + 1}")
        with engine.begin() as conn:
            # A write first takes SQLite's write lock (PostgreSQL: the row's lock), so of two processes opening the
            # same old database at once, the second waits here and then finds the step done.
            conn.execute(update(table).values(version=table.c.version))
            if conn.execute(select(table.c.version)).scalar_one() > v:
                continue
            step(conn)
            conn.execute(update(table).values(version=v + 1, updated_at=utcnow()))


def schema_drift(engine: Engine) -> list[str]:
    """`table.column` of every column the table models define that the database lacks (empty when in step)."""
    from sqlmodel import SQLModel

    insp = inspect(engine)
    missing = []
    for table in SQLModel.metadata.sorted_tables:
        if not insp.has_table(table.name):
            missing.append(f"{table.name}.*")
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in have]
    return missing
