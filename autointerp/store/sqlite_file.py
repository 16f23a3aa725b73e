"""A SQLite database file, checked before anything opens it for writing, and the errors a store raises.

A file that is not a database, or shorter than its header says, is refused naming the file; its schema version is
read without a lock or a new -wal file; SQLite's corruption and read-only errors become StoreErrors naming it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


class StoreError(RuntimeError):
    """The database cannot be used (bad URL, not a database, corrupt, newer schema, unreachable server)."""


def is_read_only(exc: BaseException) -> bool:
    """Whether a database error is a refused write: a read-only SQLite file or connection, a PostgreSQL read-only
    transaction, a role without the privilege."""
    words = str(getattr(exc, "orig", None) or exc).lower()
    return any(w in words for w in ("readonly", "read-only", "permission denied"))


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for in-memory databases and other backends)."""
    if not url.startswith("sqlite"):
        return None
    try:
        database = make_url(url).database
    except ArgumentError:
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


_SQLITE_MAGIC = b"SQLite format 3\x00"
_CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
_CORRUPT_WORDS = ("malformed", "not a database")


def _is_corruption(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_CORRUPT_CODES) or any(w in str(exc) for w in _CORRUPT_WORDS)


def _is_read_only(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_READONLY") or "readonly database" in str(exc)


class ReadOnlyStore(StoreError):
    """A write to a database that cannot be written (a read-only file, directory or mount)."""


def _read_only(path: Path, exc: BaseException) -> StoreError:
    return ReadOnlyStore(
        f"database {path} is read-only (SQLite: {exc}): this command writes to it; make the file (and its "
        "directory) writable, or work on a writable copy"
    )


def _corrupt(path: Path, why: str) -> StoreError:
    return StoreError(f"{path}: {why}; the file is damaged: restore it from a copy, or collect into a new database")


def check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not a SQLite database, or is shorter than its header says, before anything writes to
    it (SQLite itself would say "file is not a database" at some later query, or serve a truncated one in part).

    The size test is skipped while a -wal or -journal file is beside it: its recovery may still need to write the
    missing pages (a checkpoint cut off by a crash).
    """
    if not path.is_file():
        return  # a new database (or no file at all: SQLite says why when it opens)
    size = path.stat().st_size
    if size == 0:
        return  # SQLite's empty database
    with path.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(_SQLITE_MAGIC):
        raise _corrupt(path, "not a SQLite database (it does not start with SQLite's file header)")
    raw_page = int.from_bytes(head[16:18], "big")
    page_size = 65536 if raw_page == 1 else raw_page
    if page_size < 512 or page_size & (page_size - 1):
        raise _corrupt(path, f"not a SQLite database (page size {raw_page} in its header)")
    n_pages = int.from_bytes(head[28:32], "big")
    header_size_valid = head[24:28] == head[92:96]  # the in-header size is valid when these counters agree
    recovering = any(path.with_name(path.name + s).exists() for s in ("-wal", "-journal"))
    if header_size_valid and not recovering and size < n_pages * page_size:
        raise _corrupt(
            path, f"truncated: {size} bytes, its header says {n_pages} pages of {page_size} ({n_pages * page_size})"
        )


def sqlite_version(path: Path) -> int | None:
    """The schema version stored in an existing SQLite file, read without changing it: immutable mode takes no
    lock and makes no -wal or -shm file (read-only mode, when a -wal file is there, so its commits are seen)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() and wal.stat().st_size > 0 else "mode=ro&immutable=1"
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True)
        try:
            has = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
            row = con.execute("SELECT version FROM schema_version").fetchone() if has else None
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise _corrupt(path, f"SQLite cannot read it ({exc})") from exc
    return int(row[0]) if row is not None else None
