"""Several processes on one database, on SQLite and on a real PostgreSQL server: `autointerp run --workers 2` runs
its chunks in two worker processes and does every unit once, with the rows and LLM calls of one worker; two
`autointerp explain --llm local` processes started at once make as many LLM calls as one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from autointerp.store import open_store
from autointerp.store.tables import Explanation, LLMCall, Run, Score, Unit

CONFIG = """db = "{db}"
[explain]
llm = "slow"
features = "all"
limit = 8
chunk = 2
[score]
llm = "slow"
methods = ["detection", "fuzzing"]
max_per_role = 3
[run]
stages = ["explain", "score"]
explainers = ["llm"]
poll_s = 0.05
[llm.slow]
backend = "fake"
model = "scripted"
options = {{delay_s = "0.2"}}
"""


def _cli(*args: str, cfg: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "autointerp.cli", *args, *(["--config", str(cfg)] if cfg else [])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def _done(*procs: subprocess.Popen[str]) -> list[str]:
    errs = []
    for p in procs:
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        errs.append(err)
    return errs


def _rows(url: str) -> dict[str, Any]:
    store = open_store(url)
    try:
        with store.session() as s:
            expls = s.exec(select(Explanation)).all()
            of = {e.id: (e.feature_id, e.explainer) for e in expls}  # ids follow the order the workers wrote in
            return {
                "explanation": sorted((e.feature_id, e.explainer, e.status, e.text) for e in expls),
                "score": sorted((*of[r.explanation_id], r.method, r.status, r.value) for r in s.exec(select(Score))),
                "calls": len(s.exec(select(LLMCall)).all()),
                "units": sorted((u.stage, u.feature_id, u.status, u.attempts) for u in s.exec(select(Unit))),
            }
    finally:
        store.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def two_dbs(request: pytest.FixtureRequest, tmp_path: Path, collected_db_file: Path, collect_into: Any) -> list[str]:
    """Two databases holding the same collection: the reference's and the test's."""
    if request.param == "sqlite":
        out = []
        for name in ("a", "b"):
            shutil.copy(collected_db_file, tmp_path / f"{name}.sqlite")
            out.append(f"sqlite:///{tmp_path / name}.sqlite")
        return out
    first = request.getfixturevalue("postgres_db")
    second = first + "_b"
    import psycopg

    admin = first.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{second.rsplit("/", 1)[1]}"')
    request.addfinalizer(lambda: _drop(admin, second.rsplit("/", 1)[1]))
    for url in (first, second):
        collect_into(url, tmp_path)
    return [first, second]


def _drop(admin: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _config(tmp_path: Path, url: str, name: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(CONFIG.format(db=url))
    return cfg


def test_run_with_two_worker_processes_does_every_unit_once(tmp_path: Path, two_dbs: list[str]) -> None:
    one, two = two_dbs
    _done(_cli("run", cfg=_config(tmp_path, one, "one")))
    _done(_cli("run", "--workers", "2", cfg=_config(tmp_path, two, "two")))
    ref, got = _rows(one), _rows(two)
    assert got == ref  # the same rows, the same number of LLM calls, every unit done once (attempts 1)
    assert len(got["explanation"]) == 8 and got["calls"] > 8
    assert {u[2:] for u in got["units"]} == {("done", 1)}
    with open_store(two).session() as s:
        labels = {r.config["label"] for r in s.exec(select(Run).where(Run.stage != "collect"))}
    assert labels == {"explain:llm", "score"}


# Small prompts and answers: the real model on two cores takes seconds per call.
LOCAL = """db = "{db}"
[explain]
features = "all"
limit = 4
chunk = 1
n_top = 4
n_quantile = 0
window = 8
max_tokens = 24
"""


def test_two_explain_processes_at_once_make_the_calls_of_one(tmp_path: Path, two_dbs: list[str]) -> None:
    """The real local SmolLM2 behind `--llm local`: the two processes share the units through their leases."""
    one, two = two_dbs
    for url, name in ((one, "one"), (two, "two")):
        (tmp_path / f"{name}.toml").write_text(LOCAL.format(db=url))
    _done(_cli("explain", "--llm", "local", cfg=tmp_path / "one.toml"))
    a = _cli("explain", "--llm", "local", cfg=tmp_path / "two.toml")
    b = _cli("explain", "--llm", "local", cfg=tmp_path / "two.toml")
    errs = _done(a, b)
    ref, got = _rows(one), _rows(two)
    assert ref["calls"] >= 4 and got["calls"] == ref["calls"], (ref["calls"], got["calls"])
    assert [e[:2] for e in got["explanation"]] == [e[:2] for e in ref["explanation"]]  # one row per feature
    assert {u[2:] for u in got["units"]} == {("done", 1)}
    assert all("explain (llm" in e for e in errs)
