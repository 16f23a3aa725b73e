"""Crash safety, shown: `autointerp collect` is SIGKILLed at chosen points inside its writes (the test hook
AUTOINTERP_TEST_KILL_AT), and the rerun resumes from where the checkpoint says and ends with the database an
uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autointerp.collect.buffers import KILL_POINTS, KillSwitch
from autointerp.collect.run import run_collect
from autointerp.config import load_config
from autointerp.store import open_store


def _dump(db: Path) -> dict[str, Any]:
    """Everything a collection writes, by natural keys (row ids and timestamps left out)."""
    con = sqlite3.connect(db)
    try:
        q = {
            "corpus": "select id, n_docs, n_contexts from corpus",
            "documents": "select corpus_id, idx, name from document order by 1, 2",
            "contexts": "select corpus_id, idx, doc_idx, offset, tokens from context order by 1, 2",
            "features": "select key, status, density, n_tokens, histogram from feature order by 1",
            "statistics": "select key, max_act, mean_act from feature order by 1",
            "records": "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
            "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2",
        }
        return {k: con.execute(v).fetchall() for k, v in q.items()}
    finally:
        con.close()


@pytest.fixture(scope="module")
def reference(crash_collection: Any) -> dict[str, Any]:
    """The dump of the uninterrupted collection."""
    return _dump(crash_collection.reference_db)


@pytest.mark.parametrize(
    ("point", "resumes_at"),
    [
        # the corpus and documents are in, no context yet; no checkpoint
        pytest.param("corpus-write", 0, id="corpus-write"),
        # the second checkpoint half written (a temporary file): the first holds (resumes_at counts checkpoints)
        pytest.param("checkpoint-write:2", 1, id="checkpoint-write"),
        # the second checkpoint in place, the run row not yet updated
        pytest.param("checkpoint-replace:2", 2, id="checkpoint-replace"),
        # some features written: the pass is saved (-1: at its end), only the write is redone
        pytest.param("final-write", -1, id="final-write"),
    ],
)
def test_kill_at_a_point_then_rerun_equals_uninterrupted(
    tmp_path: Path, crash_collection: Any, reference: dict[str, Any], point: str, resumes_at: int
) -> None:
    c = crash_collection
    cfg_path = c.config(tmp_path / "cut")
    env = dict(os.environ, AUTOINTERP_TEST_KILL_AT=point)
    killed = subprocess.run(
        [sys.executable, "-m", "autointerp.cli", "collect", "--config", str(cfg_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # it died at the point, not before or after
    db = tmp_path / "cut" / "db.sqlite"
    con = sqlite3.connect(db)
    status, counts = con.execute("select status, counts from run").fetchone()
    n_features = con.execute("select count(*) from feature").fetchone()[0]
    con.close()
    assert status == "running" and json.loads(counts) == {}  # as a crash leaves it: nothing said it ended
    # final-write: the chunk the kill follows, and the next one if the writer thread finished it meanwhile
    assert n_features in ((16, 32) if point == "final-write" else (0,))
    ckpts = tmp_path / "cut" / "checkpoints"
    if point == "checkpoint-write:2":
        assert any(ckpts.glob("*.tmp*")), "the half-written checkpoint is left behind"

    cfg = load_config(cfg_path)
    again = run_collect(cfg, open_store(cfg.db))
    assert again.status == "done"
    assert again.resumed_at_batch == (c.n_batches if resumes_at < 0 else resumes_at * c.checkpoint_every)
    c.assert_same(_dump(db), reference)
    assert not list(ckpts.iterdir()), "no checkpoint or temporary file is left"


def test_kill_points_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(KILL_POINTS) == {"corpus-write", "checkpoint-write", "checkpoint-replace", "final-write"}
    with pytest.raises(ValueError, match="AUTOINTERP_TEST_KILL_AT='checkpoint-wirte'"):
        KillSwitch("checkpoint-wirte")
    killed: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    switch = KillSwitch("final-write:2")
    for point in ("corpus-write", "final-write", "checkpoint-write", "final-write", "final-write"):
        switch(point)
    assert killed == [signal.SIGKILL]  # once, the second time final-write was reached
    KillSwitch(None)("final-write")
    assert killed == [signal.SIGKILL]
