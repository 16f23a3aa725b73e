"""Where a collection's checkpoint is kept: a file beside a SQLite database, the database itself on PostgreSQL.
Both hold the same checksummed bytes (collect.buffers) and are replaced atomically."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from autointerp.collect.buffers import CheckpointError, read_state, save_state, state_from_bytes, write_state
from autointerp.collect.sampler import FeatureSampler
from autointerp.store.checkpoints import checkpoint_writer, delete_checkpoint, has_checkpoint, read_checkpoint
from autointerp.store.engine import Store
from autointerp.subject.files import cache_home


def checkpoint_dir(store: Store) -> Path:
    """Where file checkpoints go: beside a SQLite database, else this machine's cache (where PostgreSQL
    collections kept them before schema 6)."""
    url = store.url
    if url.startswith("sqlite:///") and url not in ("sqlite:///:memory:",):
        return Path(url[len("sqlite:///") :]).resolve().parent / "checkpoints"
    return cache_home() / "checkpoints"


class FileCheckpoint:
    """A collection's checkpoint as a file (SQLite: beside the database, so wherever the database file is
    reachable, so is its checkpoint). Replaced by renaming a temporary file over it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def clean(self) -> None:
        for stale in self.path.parent.glob(f"{self.path.stem}.tmp*"):
            stale.unlink(missing_ok=True)  # left by a process killed while writing a checkpoint

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, next_batch: int, samplers: list[FeatureSampler], on_written: Callable[[], None]) -> str:
        return save_checkpoint(self.path, next_batch, samplers, on_written)

    def restore(self, samplers: list[FeatureSampler], n_batches: int) -> int:
        return restore_checkpoint(self.path, samplers, n_batches)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def label(self, digest: str) -> str:
        return f"{self.path.name} sha256:{digest[:16]}"


class DatabaseCheckpoint:
    """A collection's checkpoint in the database's checkpoint table (PostgreSQL: a collection started on one
    machine resumes on any machine that reaches the server). The same bytes as a file checkpoint, with the same
    checksum; replaced in one transaction. A file left at the pre-schema-6 place (`legacy`) is resumed from
    while the database holds none."""

    def __init__(self, store: Store, key: str, legacy: Path | None = None) -> None:
        self.store, self.key, self.legacy = store, key, legacy

    def __str__(self) -> str:
        return f"database:{self.key}"

    def clean(self) -> None:  # an interrupted write is a rolled-back transaction: nothing is left
        pass

    def exists(self) -> bool:
        return has_checkpoint(self.store, self.key) or (self.legacy is not None and self.legacy.exists())

    def save(self, next_batch: int, samplers: list[FeatureSampler], on_written: Callable[[], None]) -> str:
        with checkpoint_writer(self.store, self.key) as sink:
            digest = save_checkpoint(sink, next_batch, samplers, on_written)
        if self.legacy is not None:
            self.legacy.unlink(missing_ok=True)
        return digest

    def restore(self, samplers: list[FeatureSampler], n_batches: int) -> int:
        data = read_checkpoint(self.store, self.key)
        if data is None and self.legacy is not None and self.legacy.exists():
            return restore_checkpoint(self.legacy, samplers, n_batches)
        if data is None:
            raise CheckpointError("it is gone (deleted by another process)")
        return restore_checkpoint(data, samplers, n_batches)

    def remove(self) -> None:
        delete_checkpoint(self.store, self.key)
        if self.legacy is not None:
            self.legacy.unlink(missing_ok=True)

    def label(self, digest: str) -> str:
        return f"{self} sha256:{digest[:16]}"


Checkpoint = FileCheckpoint | DatabaseCheckpoint


def checkpoint_for(store: Store, run_key: str) -> Checkpoint:
    """Where the checkpoint of collection `run_key` is kept: in the database on PostgreSQL (every worker reaches
    it), in a file beside the database on SQLite (as reachable as the database file, and no checkpoint of tens of
    MB goes through SQLite's WAL or grows its file for good)."""
    path = checkpoint_dir(store) / f"{run_key}.pt"
    if store.dialect.sqlite:
        return FileCheckpoint(path)
    return DatabaseCheckpoint(store, run_key, legacy=path)


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """A Ctrl-C that arrives inside the block takes effect when it ends: a checkpoint replaced on disk and the count
    that says what it holds then change together (the interruption message and the resume point agree). Only the
    main thread can install handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[tuple[int, Any]] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and callable(old):
            old(*got[0])  # the default handler raises KeyboardInterrupt here; another handler does what it does


def save_checkpoint(
    dest: Path | Any, next_batch: int, samplers: list[FeatureSampler], on_written: Callable[[], None]
) -> str:
    """The samplers' state after `next_batch` batches, as a checksummed file at `dest`, or written to the sink
    `dest` (a database checkpoint); returns its SHA-256."""
    state = {"next_batch": next_batch, "samplers": [s.state() for s in samplers]}
    if isinstance(dest, Path):
        return save_state(dest, state, on_written)
    return write_state(dest, state, on_written)


def restore_checkpoint(source: Path | bytes, samplers: list[FeatureSampler], n_batches: int) -> int:
    """Load a checkpoint (a file, or the bytes of one kept in the database) into `samplers` (half loaded on error:
    start afresh then); returns the next batch."""
    state = read_state(source) if isinstance(source, Path) else state_from_bytes(source, "checkpoint")
    if not {"next_batch", "samplers"} <= set(state) or len(state["samplers"]) != len(samplers):
        raise CheckpointError("not a checkpoint of this collection")
    next_batch = int(state["next_batch"])
    if not 0 < next_batch <= n_batches:
        raise CheckpointError(f"next batch {next_batch} is outside 1..{n_batches}")
    for sampler, st in zip(samplers, state["samplers"], strict=True):
        sampler.load(st)
    return next_batch
