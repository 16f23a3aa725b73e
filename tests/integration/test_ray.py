"""Sharded collection on real executors: a pool of worker processes (`run --workers 2`) and a Ray cluster started
in this process (`ray.init(num_cpus=2)`), each shard a task from plain data, write the very rows one uninterrupted
pass writes (the crash tests' collection of a tiny GPT-2), on SQLite and on PostgreSQL (where the shards' states
go to the database's checkpoint table, for every node to reach)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from autointerp.config import load_config
from autointerp.jobs.executors import ProcessExecutor
from autointerp.run.job import PipelineJob
from autointerp.store import open_store
from autointerp.store.tables import Unit

ray = pytest.importorskip("ray")
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _short_dir() -> str:
    # Ray's session holds unix sockets, whose paths are limited to ~107 bytes: pytest's temp paths can be too long
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A Ray cluster of this process, two CPUs, no dashboard; shut down (no raylet left) after the module. On
    loopback: Ray's agents otherwise resolve the host's address, which the tests' network guard refuses."""
    from ray._private import ray_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOOPBACK, "0")  # a one-machine cluster: Ray's processes then use 127.0.0.1
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # read by this process, imported before
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=_short_dir())
        try:
            yield ray
        finally:
            ray.shutdown()


def _shard_units(db: str) -> list[Unit]:
    with open_store(db).session() as s:
        return list(s.exec(select(Unit).where(Unit.stage == "collect-shard")).all())


def test_worker_processes_run_the_shards(
    tmp_path: Path, crash_collection: Any, reference: Any, collection_rows: Any
) -> None:
    cfg = load_config(crash_collection.config(tmp_path / "w"))
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=ProcessExecutor(2))
    assert job.run().status == "done"
    assert job.shards == 2 and sorted(s["shard"] for s in job.shard_log) == [0, 1]
    assert [u.status for u in _shard_units(cfg.db)] == ["done", "done"]
    from autointerp.run.status import job_status

    shards = {s.stage: s for s in job_status(open_store(cfg.db)).stages}["collect-shard"]
    assert (shards.done, shards.pending, shards.in_progress) == (2, 0, 0)  # `status` shows the shards
    assert collection_rows(cfg.db) == reference


def test_ray_tasks_run_the_shards(
    tmp_path: Path, crash_collection: Any, reference: Any, collection_rows: Any, local_ray: Any
) -> None:
    from autointerp.jobs.ray_executor import RayExecutor

    cfg = load_config(crash_collection.config(tmp_path / "r"))
    executor = RayExecutor()
    assert executor.slots == 2 and executor.gpus == 0
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=executor, shards=4)
    assert job.run().status == "done"
    assert sorted(s["shard"] for s in job.shard_log) == [0, 1, 2, 3]
    assert local_ray.is_initialized()  # a cluster the job did not start is left running
    assert collection_rows(cfg.db) == reference


def test_ray_shards_on_postgresql(
    postgres_db: str, tmp_path: Path, crash_collection: Any, reference: Any, collection_rows: Any, local_ray: Any
) -> None:
    from autointerp.jobs.ray_executor import RayExecutor
    from autointerp.store.tables import CheckpointPart

    cfg = load_config(crash_collection.config(tmp_path / "pg", db=postgres_db))
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=RayExecutor(), shards=3)
    assert job.run().status == "done" and len(job.shard_log) == 3
    with open_store(cfg.db).session() as s:
        assert s.exec(select(CheckpointPart)).all() == []  # the shards' states, merged, are removed
    assert not list((tmp_path / "pg").rglob("*.pt"))  # nothing went to a file on this "machine"
    assert collection_rows(cfg.db) == reference


def test_a_driver_killed_mid_collection_keeps_its_finished_shards(
    tmp_path: Path, crash_collection: Any, reference: Any, collection_rows: Any
) -> None:
    """`autointerp run --workers 2 --shards 6` SIGKILLed (the driver and its pool) once a shard is stored; the same
    command again collects only the shards not stored, and the rows equal the single pass's."""
    cfg_path = crash_collection.config(tmp_path / "k")
    db = tmp_path / "k" / "db.sqlite"
    cmd = [sys.executable, "-m", "autointerp.cli", "run", "--stages", "collect", "--workers", "2", "--shards", "6",
           "--config", str(cfg_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done, t0 = 0, time.monotonic()
    try:
        while done < 1 and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.5)
            if db.exists():
                con = sqlite3.connect(db, timeout=30)
                try:
                    done = con.execute("select count(*) from unit where stage = 'collect-shard' and status = 'done'"
                                       ).fetchone()[0]  # fmt: skip
                except sqlite3.OperationalError:  # the tables are not there yet
                    pass
                finally:
                    con.close()
        assert done >= 1 and proc.poll() is None, (done, proc.returncode)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes, as a crash leaves them
        proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    con = sqlite3.connect(db)
    counts = json.loads(con.execute("select counts from run where stage = 'collect'").fetchone()[0])
    con.close()
    assert counts["shards"] == 6 and 1 <= counts["shards_stored_before"] < 6  # the finished shards were kept
    assert collection_rows(f"sqlite:///{db}") == reference
