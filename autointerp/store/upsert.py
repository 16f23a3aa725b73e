"""One idempotent write for result rows: insert, or update the stored row with the same natural key."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, col, select

from autointerp.store.dialect import among
from autointerp.store.engine import Store
from autointerp.store.tables import utcnow

T = TypeVar("T", bound=SQLModel)


def upsert(
    store: Store,
    rows: Sequence[T],
    key: Sequence[str],
    fields: Sequence[str],
    *,
    keep: Callable[[T, T], bool] | None = None,
    add: Sequence[str] = (),
) -> list[T]:
    """Write `rows` in one transaction and return the stored rows.

    A row whose natural `key` is new is inserted; otherwise `fields` are copied onto the stored row (and `add`
    fields summed), unless `keep(stored, row)` says the stored row stays as it is (it is final, or the same). A
    concurrent writer that inserted the same key first makes the transaction retry once, then its row is updated
    like any other.
    """
    cls = type(rows[0]) if rows else None
    for row in rows:
        for name in fields:  # text PostgreSQL cannot hold (a NUL in an LLM's answer) stored as it can
            setattr(row, name, store.dialect.storable(getattr(row, name)))
    for attempt in range(2):
        out: list[T] = []
        with store.session() as s:
            for row in rows:
                assert cls is not None
                q = select(cls)
                for name in key:
                    q = q.where(getattr(cls, name) == getattr(row, name))
                found = s.exec(q).first()
                if found is None:
                    s.add(row)
                    out.append(row)
                    continue
                if keep is None or not keep(found, row):
                    for name in fields:
                        setattr(found, name, getattr(row, name))
                    for name in add:
                        setattr(found, name, getattr(found, name) + getattr(row, name))
                    if hasattr(found, "created_at"):
                        found.created_at = utcnow()
                    s.add(found)
                out.append(found)
            try:
                s.commit()
            except IntegrityError:
                if attempt:
                    raise
                s.rollback()
                continue
            for r in out:
                s.refresh(r)
            return out
    return []


def insert_missing(store: Store, rows: Sequence[T], key: Sequence[str]) -> list[T]:
    """Insert the rows whose natural `key` is new, and leave the stored ones as they are (a concurrent writer's
    included); returns the stored rows."""
    return upsert(store, rows, key, (), keep=_stored_wins) if rows else []


def _stored_wins(_stored: Any, _new: Any) -> bool:
    return True


def finished(
    store: Store,
    cls: type[SQLModel],
    column: str,
    match: dict[str, Any],
    statuses: Sequence[str],
    within: Sequence[Any] | None = None,
) -> set[Any]:
    """Values of `column` over the rows of `cls` whose fields equal `match` and whose status is final (one of
    `statuses`), optionally only among `within`: what a rerun skips (rows with other statuses are redone)."""
    q = select(getattr(cls, column)).where(col(cls.status).in_(list(statuses)))  # type: ignore[attr-defined]
    for name, value in match.items():
        q = q.where(getattr(cls, name) == value)
    if within is not None:
        q = q.where(among(store, col(getattr(cls, column)), within))
    with store.session() as s:
        return set(s.exec(q).all())
