"""Engine from a URL: SQLite (WAL, sane pragmas) by default, PostgreSQL with the same schema.

Opening checks before it writes: a SQLite file that is not a database, or shorter than its header says (a
truncated copy), and a database of a newer schema than this code are refused with a StoreError naming the file,
and left as they were. Corruption found later, by any query, is a StoreError naming the file too, and so is a
write to a read-only database. A SQLite file this process cannot write (its mode, its directory's, a read-only
mount) is opened read-only: every read works, a write is refused (`is_read_only` tells such an error apart).

`open_store(url, create=False)` opens only a database that exists (the read commands: a mistyped path is an error,
never a new empty database); `writable=True` proves first that it can be written (the commands that write).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool, StaticPool
from sqlmodel import Session, SQLModel, create_engine, select

from autointerp.config import DEFAULT_DB_URL
from autointerp.store import tables
from autointerp.store.dialect import Dialect, dialect_of
from autointerp.store.sqlite_file import (  # noqa: F401  (StoreError and the checks are imported from here too)
    ReadOnlyStore,
    StoreError,
    _corrupt,
    _is_corruption,
    _is_read_only,
    _read_only,
    check_sqlite_file,
    is_read_only,
    sqlite_file,
    sqlite_version,
)
from autointerp.store.tables import SCHEMA_VERSION, SchemaVersion, utcnow


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers (the review page) work while a job writes; NORMAL is durable at checkpoints in WAL mode.
    # Switching a new database to WAL needs it to itself and answers "locked" at once, without the busy wait,
    # when another process is opening it too: a few tries.
    for attempt in range(100):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def _sqlite_read_only_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")  # a read waits out a writer's checkpoint like any other reader
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.close()


def json_for_postgresql(value: Any) -> str:
    """json.dumps, with null for NaN and infinities: JSON has none of them, and PostgreSQL's json type refuses
    Python's spelling of them (NaN, Infinity) where SQLite stores any text. A value holding one (a p-value of a
    degenerate test, a logprob of -inf) is kept, with that number unknown, instead of failing its write."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite_or_none(value), allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _name_errors(engine: Engine, file: Path) -> None:
    """A damaged page found by some query, or a write to a read-only file, raised as a StoreError naming the file,
    not only in SQLite's words (and no traceback: a StoreError is the user's to fix)."""

    def named(ctx: ExceptionContext) -> None:
        if _is_corruption(ctx.original_exception):
            raise _corrupt(file, f"SQLite: {ctx.original_exception}") from ctx.original_exception
        if _is_read_only(ctx.original_exception):
            raise _read_only(file, ctx.original_exception) from ctx.original_exception

    event.listen(engine, "handle_error", named)


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
        file = sqlite_file(url)
        if file is not None:
            _name_errors(engine, file)
        return engine
    if url.startswith(("postgresql", "postgres")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://") :]
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url[len("postgresql://") :]
        try:
            return create_engine(url, pool_pre_ping=True, json_serializer=json_for_postgresql)
        except ModuleNotFoundError as exc:  # the driver is an extra: say how to get it, not where it was missed
            raise StoreError(
                f"{_shown(url)}: PostgreSQL needs its driver, which is not installed ({exc.name}): "
                "pip install 'autointerp[postgres]'"
            ) from None
    raise StoreError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")


@dataclass
class Store:
    """An open feature database: its URL, a SQLAlchemy engine, and whether it may be written.

    Made by `open_store` only (which creates or migrates the schema once, so no reader ever runs DDL). Everything
    that reads or writes it goes through the functions of autointerp.store (no SQL outside that package); what
    differs between SQLite and PostgreSQL is asked of `dialect`, never of the URL."""

    url: str
    engine: Engine
    read_only: bool = False  # a SQLite file this process cannot write, opened for reading only

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> Dialect:
        """What differs between SQLite and PostgreSQL (store/dialect.py)."""
        return dialect_of(self.engine)


def _shown(url: str) -> str:
    """The database as messages name it: the file of a SQLite URL, else the URL without its password."""
    file = sqlite_file(url)
    if file is not None:
        return str(file)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _refuse_newer(where: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} is newer than this autointerp's ({SCHEMA_VERSION}); upgrade "
            "autointerp to open it (the database was left unchanged)"
        )


def _stored_version(engine: Engine) -> int | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("schema_version"):
            return None
        return conn.execute(text("SELECT version FROM schema_version")).scalar()


def _create_tables(engine: Engine) -> None:
    """create_all, one process at a time: it checks, then creates, so two workers opening a new database at once
    would both try to create the same table ("already exists"). SQLite: inside BEGIN IMMEDIATE (its DDL is
    transactional; the next worker waits, then finds every table); PostgreSQL: under an advisory lock."""
    with engine.connect() as conn:
        dialect_of(conn).one_at_a_time(conn, "autointerp.create_all")
        SQLModel.metadata.create_all(conn)
        table = SchemaVersion.__table__  # type: ignore[attr-defined]
        if conn.execute(select(table.c.version)).first() is None:  # a new database: its version, in the same lock
            conn.execute(table.insert().values(id=1, version=SCHEMA_VERSION, updated_at=utcnow()))
        conn.commit()


def _writable(file: Path) -> bool:
    """Whether this process can write a SQLite file: the file and its directory (for the -wal, -shm, -journal
    files); access() also says no on a read-only mount, for root too."""
    return os.access(file, os.W_OK) and os.access(file.parent, os.W_OK)


def _open_read_only(url: str, file: Path, version: int | None) -> Store:
    """A SQLite file this process cannot write, opened read-only (mode=ro: SQLite refuses every write). In a
    directory it cannot write either, SQLite cannot make the -shm file a WAL reader needs: without a -wal file
    there, no writer is active and the file is read as immutable (a snapshot: later writes by another user are
    seen after a restart)."""
    where = _shown(url)
    if version is None:
        raise StoreError(f"{where}: read-only and not an autointerp database yet; give a database it can write")
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} must be upgraded to {SCHEMA_VERSION}, which writes, and the file is "
            "read-only; open it once with write access (any autointerp command) to upgrade it"
        )
    wal = file.with_name(file.name + "-wal")
    immutable = not os.access(file.parent, os.W_OK) and not wal.exists()
    uri = file.resolve().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    event.listen(engine, "connect", _sqlite_read_only_pragmas)

    _name_errors(engine, file)
    return Store(url=url, engine=engine, read_only=True)


def _check_exists(file: Path | None) -> None:
    """For create=False: the database must be there already (a typo in a path is an error, not a new database)."""
    if file is None:
        return
    if not file.exists():
        missing = next((p for p in reversed(file.parents) if not p.exists()), None)
        why = f"the directory {missing} does not exist" if missing is not None else "the file does not exist"
        raise StoreError(
            f"no database at {file} ({why}): check the path (--db), or collect into it first (autointerp collect, "
            "or autointerp run with the collect stage)"
        )
    if file.is_file() and file.stat().st_size == 0:
        raise StoreError(f"{file} is an empty file, not a database: collect into it first (autointerp collect)")


def _open_error(where: str, file: Path | None, exc: Exception) -> StoreError:
    """A StoreError for a database that cannot be opened, in the user's terms where we know them."""
    orig = getattr(exc, "orig", None) or exc  # the driver's own error, without SQLAlchemy's link
    words = str(orig).strip()
    if file is not None and file.is_dir():
        return StoreError(f"{file} is a directory, not a database file")
    if file is not None and file.exists() and not os.access(file.parent, os.W_OK):
        return StoreError(
            f"cannot open database {file}: its directory {file.parent} is read-only, and SQLite writes its -wal "
            "and -shm files beside the database; copy it somewhere writable"
        )
    if "does not exist" in words and file is None:  # PostgreSQL: no database of that name on the server
        return StoreError(f"database {where} does not exist on the server ({words.splitlines()[-1]}): create it "
                          "first (createdb NAME), or check the URL")  # fmt: skip
    return StoreError(f"cannot open database {where}: {words}")


def _prove_writable(engine: Engine, where: str, file: Path | None) -> None:
    """Write nothing, but as a write would (a no-op update, rolled back): a read-only database fails here, before
    the command loads a model or calls an LLM, not at its first result."""
    try:
        with engine.connect() as conn:
            dialect_of(conn).begin_write(conn)
            conn.execute(text("UPDATE schema_version SET version = version"))
            conn.rollback()
    except StoreError:
        raise
    except Exception as exc:
        orig = getattr(exc, "orig", None) or exc
        if file is not None and _is_read_only(orig):
            raise _read_only(file, orig) from exc
        raise StoreError(f"cannot write to database {where}: {str(orig).strip()}") from exc


def open_store(url: str = DEFAULT_DB_URL, *, create: bool = True, writable: bool = False) -> Store:
    """Open (and create or migrate) the database at `url`.

    create=False: only a database that exists and holds autointerp's tables (else a StoreError naming it, and
    nothing is created). writable=True: a database that cannot be written is a StoreError now, not at the first
    write. Otherwise a SQLite file this process cannot write is opened for reading only (`Store.read_only`).
    Opened for writing, its query schema (full-text index, views, the list's indexes) is made here, once, so that
    readers never write."""
    where = _shown(url)
    file = sqlite_file(url)
    if url.startswith("sqlite") and "///" in url and not url.split("///", 1)[1].split("?", 1)[0]:
        # SQLAlchemy would open a private in-memory database per connection: nothing kept, nothing shared
        raise StoreError(f"database URL {url!r} names no file: use sqlite:///PATH (or sqlite:// for one in memory)")
    if url.startswith("sqlite") and "///file:" in url:
        # a URI file name would slip past every check on the file below (existence, kind, read-only)
        raise StoreError(f"database URL {url!r}: SQLite URI file names (file:...) are not supported; give "
                         "sqlite:///PATH")  # fmt: skip
    if not create:
        _check_exists(file)
    if file is not None:
        if file.is_dir():
            raise StoreError(f"{file} is a directory, not a database file")
        # Before SQLAlchemy connects: its connect hook already writes (journal mode), and create_all would add
        # tables to a database this code must not touch.
        check_sqlite_file(file)
        found = sqlite_version(file)
        if found is not None:
            _refuse_newer(where, found)
        elif not create:
            raise StoreError(f"{file} is a SQLite database but not autointerp's (it has no schema_version table)")
        if file.is_file() and not _writable(file):
            if writable:
                raise ReadOnlyStore(
                    f"database {file} is read-only (its file, its directory or the mount): this command writes to it; "
                    "make the file (and its directory) writable, or work on a writable copy"
                )
            return _open_read_only(url, file, found)
    engine = make_engine(url)
    _ = tables  # the import registers every table on SQLModel.metadata
    try:
        found = _stored_version(engine)
        if found is not None:
            _refuse_newer(where, found)
        elif not create and (file is not None or not url.startswith("sqlite")):  # (in memory: new by definition)
            raise StoreError(f"database {where} holds no autointerp tables: collect into it first")
        _create_tables(engine)
        if writable:
            _prove_writable(engine, where, file)
    except StoreError:
        engine.dispose()
        raise
    except Exception as exc:  # connection refused, permission denied, ...
        engine.dispose()
        raise _open_error(where, file, exc) from exc
    with Session(engine) as s:  # _create_tables wrote the version of a new database
        row = s.exec(select(SchemaVersion)).one()
        if row.version < SCHEMA_VERSION:
            from autointerp.store.migrations import migrate

            migrate(engine, row.version, SCHEMA_VERSION)
    store = Store(url=url, engine=engine)
    from autointerp.store.search import ensure_query_schema  # it imports this module

    ensure_query_schema(store)
    return store
