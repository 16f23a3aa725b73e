"""A collection's checkpoint kept in the database (table `checkpoint`, schema 6): the bytes of the checkpoint file
format written in parts, replaced in one transaction. Used on PostgreSQL, so that a collection started on one
machine resumes on any other (collect.checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import delete, insert
from sqlmodel import col, select

from autointerp.store.engine import Store
from autointerp.store.tables import CheckpointPart, utcnow

CHECKPOINT_PART_BYTES = 16 << 20


class CheckpointSink:
    """A write-only file whose bytes become the parts of one checkpoint (see `checkpoint_writer`)."""

    def __init__(self, conn: Any, key: str, part_bytes: int) -> None:
        self.conn, self.key, self.part_bytes = conn, key, part_bytes
        self.buf = bytearray()
        self.n_parts = 0

    def write(self, b: bytes) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        while view:
            take = self.part_bytes - len(self.buf)
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) >= self.part_bytes:
                self._flush()
        return n

    def flush(self) -> None:  # the parts go in as they fill; `close` writes the last one
        pass

    def _flush(self) -> None:
        row = {"key": self.key, "part": self.n_parts, "data": bytes(self.buf), "written_at": utcnow()}
        self.conn.execute(insert(CheckpointPart.__table__).values(**row))  # type: ignore[attr-defined]
        self.n_parts += 1
        self.buf = bytearray()

    def close(self) -> None:
        if self.buf or not self.n_parts:
            self._flush()


@contextmanager
def checkpoint_writer(store: Store, key: str, part_bytes: int | None = None) -> Iterator[CheckpointSink]:
    """A sink for the bytes of checkpoint `key` (in parts of `part_bytes`, CHECKPOINT_PART_BYTES by default), which
    replace the stored ones when the block ends without error, in one transaction: a process killed before then
    leaves the previous checkpoint whole (its transaction is rolled back), as the rename of a temporary file does
    for a file checkpoint."""
    with store.engine.begin() as conn:
        conn.execute(delete(CheckpointPart).where(col(CheckpointPart.key) == key))
        sink = CheckpointSink(conn, key, part_bytes or CHECKPOINT_PART_BYTES)
        yield sink
        sink.close()


def read_checkpoint(store: Store, key: str) -> bytes | None:
    """The bytes of checkpoint `key` (its parts in order), or None when there is none."""
    q = select(CheckpointPart.data).where(CheckpointPart.key == key).order_by(col(CheckpointPart.part))
    with store.session() as s:
        parts = s.exec(q).all()
    return b"".join(parts) if parts else None


def has_checkpoint(store: Store, key: str) -> bool:
    with store.session() as s:
        return s.exec(select(CheckpointPart.part).where(CheckpointPart.key == key).limit(1)).first() is not None


def delete_checkpoint(store: Store, key: str) -> None:
    with store.session() as s:
        s.execute(delete(CheckpointPart).where(col(CheckpointPart.key) == key))
        s.commit()
