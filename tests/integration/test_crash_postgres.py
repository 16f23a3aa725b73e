"""A collection on PostgreSQL keeps its checkpoint in the database: SIGKILLed at chosen points of its writes (the
test hook AUTOINTERP_TEST_KILL_AT), it is resumed by another process whose checkpoint directory is empty (its own
AUTOINTERP_HOME, as on another machine), from where the database's checkpoint says, and ends with the rows an
uninterrupted collection writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from autointerp.collect.buffers import state_from_bytes
from autointerp.store import open_store
from autointerp.store.checkpoints import read_checkpoint


def _dump(url: str) -> dict[str, Any]:
    """Everything a collection writes, by natural keys (row ids and timestamps left out), alike on both databases."""
    q = {
        "corpus": "select id, n_docs, n_contexts from corpus",
        "documents": "select corpus_id, idx, name from document order by 1, 2",
        "contexts": 'select corpus_id, idx, doc_idx, "offset", tokens from context order by 1, 2',
        "features": "select key, status, density, n_tokens, histogram from feature order by 1",
        "statistics": "select key, max_act, mean_act from feature order by 1",
        "records": "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
        "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2",
    }
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            out = {k: [tuple(r) for r in conn.execute(text(v))] for k, v in q.items()}
    finally:
        store.engine.dispose()
    # SQLite hands JSON back as its text, psycopg decoded: compare the values
    out["features"] = [(*r[:-1], json.loads(r[-1]) if isinstance(r[-1], str) else r[-1]) for r in out["features"]]
    return out


@pytest.fixture(scope="module")
def reference(crash_collection: Any) -> dict[str, Any]:
    """The dump of the uninterrupted collection (the same small collection as the SQLite crash tests, on SQLite)."""
    return _dump(f"sqlite:///{crash_collection.reference_db}")


def _collect(cfg: Path, home: Path, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUTOINTERP_TEST_KILL_AT"}
    env["AUTOINTERP_HOME"] = str(home)  # this "machine"'s own cache: where file checkpoints would go
    if kill_at:
        env["AUTOINTERP_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "autointerp.cli", "collect", "--config", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("point", "stored", "resumes_at"),
    [
        # the second checkpoint written, its transaction not committed: the first one holds (counted in checkpoints)
        pytest.param("checkpoint-write:2", 1, 1, id="checkpoint-write"),
        # the second checkpoint committed, the run row not yet updated (it says the first)
        pytest.param("checkpoint-replace:2", 2, 2, id="checkpoint-replace"),
        # some features written: the pass is saved (-1: at its end), only the write is redone
        pytest.param("final-write", -1, -1, id="final-write"),
    ],
)
def test_killed_on_postgresql_resumes_elsewhere_from_the_database(
    tmp_path: Path,
    postgres_db: str,
    crash_collection: Any,
    reference: dict[str, Any],
    point: str,
    stored: int,
    resumes_at: int,
) -> None:
    c = crash_collection
    n_batches, every = c.n_batches, c.checkpoint_every
    cfg = c.config(tmp_path / "job", postgres_db)
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir()
    second.mkdir()
    killed = _collect(cfg, first, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died at the point, not before or after

    store = open_store(postgres_db)
    with store.engine.connect() as conn:
        ((key, status, counts, progress),) = conn.execute(text("select key, status, counts, progress from run"))
    assert status == "running" and counts == {}  # as a crash leaves it: nothing said it ended
    data = read_checkpoint(store, key)
    assert data is not None, "the checkpoint is in the database"
    expect = n_batches if stored < 0 else stored * every
    assert state_from_bytes(data)["next_batch"] == expect
    assert progress == (expect if point != "checkpoint-replace:2" else every)
    assert _files(first) == [], "nothing was checkpointed to a file"
    store.engine.dispose()

    again = _collect(cfg, second)  # another process, with an empty checkpoint directory of its own
    assert again.returncode == 0, again.stderr
    store = open_store(postgres_db)
    with store.engine.connect() as conn:
        done = conn.execute(text("select status, counts from run")).one()
        parts = conn.execute(text("select count(*) from checkpoint")).scalar()
    store.engine.dispose()
    assert done[0] == "done" and done[1]["resumed_at_batch"] == (n_batches if resumes_at < 0 else resumes_at * every)
    c.assert_same(_dump(postgres_db), reference)
    assert parts == 0, "the checkpoint is removed once the collection is done"
    assert _files(first) == _files(second) == []
