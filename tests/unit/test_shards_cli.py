"""`autointerp run --engine/--address/--shards`: bad values are refused with exit 2 before a database is opened, and
nothing but `--engine ray` imports Ray (the job runner, the collector's shards and the CLI load without it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--engine", "spark"], "choose local or ray, not 'spark'"),
        (["--address", "auto"], "--address is for --engine ray"),
        (["--engine", "ray", "--workers", "2"], "give --workers or --engine ray, not both"),
        (["--engine", "ray", "--db", "sqlite://"], "an in-memory database cannot be shared by Ray tasks"),
        (["--shards", "0"], "--shards"),
    ],
)
def test_bad_engine_flags_exit_2_and_create_nothing(
    run_main: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], said: str
) -> None:
    monkeypatch.chdir(tmp_path)
    db = [] if "--db" in args else ["--db", f"sqlite:///{tmp_path}/x.sqlite"]
    code, out, err = run_main(["run", "--stages", "explain", *db, *args])
    assert code == 2, (out, err)
    assert said in " ".join((out + err).split()), out + err
    assert not (tmp_path / "x.sqlite").exists()


def test_nothing_imports_ray_without_engine_ray() -> None:
    probe = (
        "import sys; import autointerp.cli.job, autointerp.run.job, autointerp.jobs.executors, "
        "autointerp.collect.shards; print('ray' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "False"
