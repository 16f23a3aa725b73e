"""What differs between SQLite and PostgreSQL, in one object: every branch of the store on the database it talks to
asks `dialect_of(store, engine, connection or session)`, never the SQLAlchemy dialect's name.

The small differences are methods here (an IN list, a case-insensitive suffix, text PostgreSQL cannot hold, the
write lock, row locks, the catalog). Whole features that each database does its own way (full-text search: FTS5 /
tsvector; the bulk path: multi-row inserts / binary COPY; where a collection's checkpoint lives; how a view carries
its definition's hash) branch on `sqlite` / `postgresql` in their own module. A database that is neither gets the
portable spelling of each (what SQLAlchemy renders), as before this object existed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ARRAY, any_, bindparam
from sqlalchemy.sql.elements import BindParameter, ColumnElement


@dataclass(frozen=True)
class Dialect:
    name: str  # SQLAlchemy's dialect name: "sqlite", "postgresql"
    driver: str = ""  # its DBAPI driver: "pysqlite", "psycopg", ...

    @property
    def sqlite(self) -> bool:
        return self.name == "sqlite"

    @property
    def postgresql(self) -> bool:
        return self.name == "postgresql"

    # ------------------------------------------------------------------------------------------ expressions
    def among(self, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
        """`column IN (values)` for any number of values. IN binds one parameter per value, and PostgreSQL's
        protocol takes at most 65,535 per statement (psycopg refuses more): there the values go as one array
        parameter, `column = ANY(:values)`, which the planner runs as it runs IN."""
        values = list(values)
        if self.postgresql:
            return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
        return column.in_(values)

    def among_sql(self, column: str, values: Iterable[Any], name: str) -> tuple[str, BindParameter[Any]]:
        """`among` for SQL text: the condition on `column` and its bind parameter `name` (bind it with
        `text(...).bindparams(param)`)."""
        values = list(values)
        if self.postgresql:
            return f"{column} = ANY(:{name})", bindparam(name, values)
        return f"{column} IN :{name}", bindparam(name, values, expanding=True)

    def endswith_ci(self, column: Any, suffix: str) -> ColumnElement[bool]:
        """`column` ends with `suffix`, ASCII case ignored on both: SQLite's LIKE ignores it already, PostgreSQL's
        does not (ILIKE there). autoescape: `_` and `%` in the suffix are characters, not wildcards."""
        if self.postgresql:
            return column.iendswith(suffix, autoescape=True)
        return column.endswith(suffix, autoescape=True)

    def storable(self, value: Any) -> Any:
        """`value` as a text column can hold it: PostgreSQL's text cannot hold a NUL character (SQLite's can),
        and an LLM's answer or the parse error quoting it may; there it is stored with U+FFFD in its place instead
        of failing the write (JSON escapes it anyway). Anything not a str is returned as it is."""
        if self.postgresql and isinstance(value, str) and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value

    # ------------------------------------------------------------------------------------------ locks
    def begin_write(self, conn: Any) -> None:
        """Take the write lock at the start of the connection's transaction, so a transaction that reads, then
        writes, never fails at its write because another writer got in between. SQLite: BEGIN IMMEDIATE (its
        single writer lock; the busy timeout waits for it). PostgreSQL locks rows as it writes: nothing to do."""
        if self.sqlite:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def one_at_a_time(self, conn: Any, name: str) -> None:
        """Let one transaction at a time past this point, across processes, for the rest of the connection's
        transaction: SQLite's write lock (BEGIN IMMEDIATE, the first statement of the transaction); PostgreSQL
        an advisory lock named `name`, released at commit."""
        if self.sqlite:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif self.postgresql:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock(hashtext('{_plain_name(name)}'))")

    @property
    def row_locks(self) -> bool:
        """Whether a claim can lock the rows it picks and skip those other transactions hold (PostgreSQL);
        otherwise the claim takes the write lock (`begin_write`)."""
        return self.postgresql

    def skip_locked(self, alias: str) -> str:
        """The suffix of a SELECT that locks its rows of `alias` and skips locked ones ('' without row locks)."""
        return f" FOR UPDATE OF {alias} SKIP LOCKED" if self.row_locks else ""

    # ------------------------------------------------------------------------------------------ catalog
    def schema_objects(self, conn: Any) -> set[str]:
        """The names of the tables and indexes in the database (SQLite: triggers and views too)."""
        if self.sqlite:
            rows = conn.exec_driver_sql("SELECT name FROM sqlite_master").all()
        else:
            rows = conn.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() UNION "
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            ).all()
        return {r[0] for r in rows}


def _plain_name(name: str) -> str:
    if not name.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"lock name {name!r}: letters, digits, '.' and '_' only")
    return name


@functools.cache
def _dialect(name: str, driver: str) -> Dialect:
    return Dialect(name, driver)


def dialect_of(where: Any) -> Dialect:
    """The Dialect of a Store, an Engine, a Connection or a Session (bound to one engine)."""
    if isinstance(where, Dialect):
        return where
    sa = getattr(where, "dialect", None)
    if isinstance(sa, Dialect):  # a Store
        return sa
    if sa is None:
        if hasattr(where, "get_bind"):  # a Session
            sa = where.get_bind().dialect
        else:
            raise TypeError(f"no database dialect on {type(where).__name__}")
    return _dialect(sa.name, sa.driver)


def among(where: Any, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`dialect_of(where).among(column, values)`: `column IN (values)`, for any number of values."""
    return dialect_of(where).among(column, values)
