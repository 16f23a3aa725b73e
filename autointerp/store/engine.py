"""Engine from a URL: SQLite (WAL, sane pragmas) by default, PostgreSQL with the same schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, create_engine, select

from autointerp.config import DEFAULT_DB_URL
from autointerp.store import tables
from autointerp.store.tables import SCHEMA_VERSION, SchemaVersion


class StoreError(RuntimeError):
    """The database cannot be used (bad URL, newer schema, unreachable server)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (the review page) work while a job writes; NORMAL is durable at checkpoints in WAL mode.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:"):
            # One shared in-memory database for every connection (tests).
            engine = create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
        else:
            path = url.split("///", 1)[1] if "///" in url else ""
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        return create_engine(url, pool_pre_ping=True)
    raise StoreError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")


@dataclass
class Store:
    url: str
    engine: Engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)


def open_store(url: str = DEFAULT_DB_URL) -> Store:
    """Open (and create or migrate) the database at `url`."""
    engine = make_engine(url)
    _ = tables  # the import registers every table on SQLModel.metadata
    try:
        SQLModel.metadata.create_all(engine)
    except Exception as exc:  # connection refused, permission denied, ...
        raise StoreError(f"cannot open database {url!r}: {exc}") from exc
    with Session(engine) as s:
        row = s.exec(select(SchemaVersion)).first()
        if row is None:
            s.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
            s.commit()
        elif row.version > SCHEMA_VERSION:
            raise StoreError(
                f"database {url!r} has schema version {row.version}, newer than this autointerp "
                f"({SCHEMA_VERSION}); upgrade autointerp"
            )
        elif row.version < SCHEMA_VERSION:
            from autointerp.store.migrations import migrate

            migrate(engine, row.version, SCHEMA_VERSION)
    return Store(url=url, engine=engine)
