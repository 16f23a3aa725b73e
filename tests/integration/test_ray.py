"""Sharded collection on real executors: a pool of worker processes (`run --workers 2`) and a Ray cluster started
in this process (`ray.init(num_cpus=2)`), each shard a task from plain data, write the very rows one uninterrupted
pass writes (the crash tests' collection of a tiny GPT-2), on SQLite and on PostgreSQL (where the shards' states
go to the database's checkpoint table, for every node to reach)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
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


def _dump(url: str) -> dict[str, Any]:
    """What a collection writes, by natural keys, alike on both databases (JSON compared as values)."""
    q = {
        "features": "select key, status, density, n_tokens, histogram, max_act, mean_act from feature order by 1",
        "records": "select f.key, c.idx, r.role, r.split, r.rank, r.bin, r.max_act, r.acts from record r "
        "join feature f on f.id = r.feature_id join context c on c.id = r.context_id order by 1, 2",
    }
    store = open_store(url)
    try:
        with store.engine.connect() as conn:
            out = {k: [tuple(r) for r in conn.execute(text(v))] for k, v in q.items()}
    finally:
        store.engine.dispose()
    out["features"] = [(*r[:4], json.loads(r[4]) if isinstance(r[4], str) else r[4], *r[5:]) for r in out["features"]]
    out["records"] = [(*r[:-1], bytes(r[-1])) for r in out["records"]]
    return out


@pytest.fixture(scope="module")
def reference(crash_collection: Any) -> dict[str, Any]:
    return _dump(f"sqlite:///{crash_collection.reference_db}")


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


def test_worker_processes_run_the_shards(tmp_path: Path, crash_collection: Any, reference: Any) -> None:
    cfg = load_config(crash_collection.config(tmp_path / "w"))
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=ProcessExecutor(2))
    assert job.run().status == "done"
    assert job.shards == 2 and sorted(s["shard"] for s in job.shard_log) == [0, 1]
    assert [u.status for u in _shard_units(cfg.db)] == ["done", "done"]
    from autointerp.run.status import job_status

    shards = {s.stage: s for s in job_status(open_store(cfg.db)).stages}["collect-shard"]
    assert (shards.done, shards.pending, shards.in_progress) == (2, 0, 0)  # `status` shows the shards
    assert _dump(cfg.db) == reference


def test_ray_tasks_run_the_shards(tmp_path: Path, crash_collection: Any, reference: Any, local_ray: Any) -> None:
    from autointerp.jobs.ray_executor import RayExecutor

    cfg = load_config(crash_collection.config(tmp_path / "r"))
    executor = RayExecutor()
    assert executor.slots == 2 and executor.gpus == 0
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=executor, shards=4)
    assert job.run().status == "done"
    assert sorted(s["shard"] for s in job.shard_log) == [0, 1, 2, 3]
    assert local_ray.is_initialized()  # a cluster the job did not start is left running
    assert _dump(cfg.db) == reference


def test_ray_shards_on_postgresql(postgres_db: str, tmp_path: Path, crash_collection: Any, reference: Any,
                                  local_ray: Any) -> None:  # fmt: skip
    from autointerp.jobs.ray_executor import RayExecutor
    from autointerp.store.tables import CheckpointPart

    cfg = load_config(crash_collection.config(tmp_path / "pg", db=postgres_db))
    job = PipelineJob(cfg, open_store(cfg.db), stages=["collect"], executor=RayExecutor(), shards=3)
    assert job.run().status == "done" and len(job.shard_log) == 3
    with open_store(cfg.db).session() as s:
        assert s.exec(select(CheckpointPart)).all() == []  # the shards' states, merged, are removed
    assert not list((tmp_path / "pg").rglob("*.pt"))  # nothing went to a file on this "machine"
    assert _dump(cfg.db) == reference


def test_a_driver_killed_mid_collection_keeps_its_finished_shards(
    tmp_path: Path, crash_collection: Any, reference: Any
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
    assert _dump(f"sqlite:///{db}") == reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _marked(marker: str) -> list[int]:
    """The processes started with the environment variable `marker` (the test's own Ray daemons and workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "environ").read_bytes().split(b"\0"):
                    out.append(int(d.name))
            except OSError:  # gone, or not ours
                continue
    return out


def _with_children(pids: list[int]) -> list[int]:
    """`pids` and every process below them (Ray's agents rename themselves, so their environment cannot be read)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = set(pids), list(pids)
    while todo:
        p = todo.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                out.add(child)
                todo.append(child)
    return sorted(out)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds its Ray processes through /proc")
def test_two_nodes_one_killed_mid_collection(tmp_path: Path, crash_collection: Any, reference: Any) -> None:
    """A real two-node cluster on this machine (`ray start --head`, then `ray start --address` for a second node),
    `autointerp run --engine ray --address ... --shards 6` against it, and the second node's raylet SIGKILLed once a
    shard is stored: Ray runs its tasks again on the head, and the rows equal the single pass's. Ray's daemons and
    workers run without the tests' network guard (in cluster mode they talk over this host's own interface address,
    which the guard refuses); the driver keeps it. Every process the cluster started is killed by pid afterwards."""
    marker = f"AUTOINTERP_RAY_TEST={uuid.uuid4().hex}"
    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": root, "RAY_AUTH_MODE": "disabled", marker.split("=")[0]: marker.split("=")[1]}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, nm1, nm2 = _free_port(), _free_port(), _free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    orphans: list[int] = []
    try:
        subprocess.run([ray_bin, "start", "--head", "--port", str(port), "--node-manager-port", str(nm1),
                        "--include-dashboard=false", "--temp-dir", _short_dir(), *common],
                       env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([ray_bin, "start", "--address", f"127.0.0.1:{port}", "--node-manager-port", str(nm2), *common],
                       env=env, check=True, capture_output=True, timeout=120)  # fmt: skip
        cfg_path = crash_collection.config(tmp_path / "n")
        db = tmp_path / "n" / "db.sqlite"
        cmd = [sys.executable, "-m", "autointerp.cli", "run", "--stages", "collect", "--engine", "ray",
               "--address", f"127.0.0.1:{port}", "--shards", "6", "--config", str(cfg_path)]  # fmt: skip
        drv_env = dict(os.environ, RAY_AUTH_MODE="disabled")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=drv_env)
        done, t0, killed = 0, time.monotonic(), []
        while proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.3)
            if not killed and db.exists():
                con = sqlite3.connect(db, timeout=30)
                try:
                    done = con.execute("select count(*) from unit where stage = 'collect-shard' and status = 'done'"
                                       ).fetchone()[0]  # fmt: skip
                except sqlite3.OperationalError:
                    pass
                finally:
                    con.close()
                if done >= 1:
                    killed = [p for p in _marked(marker) if f"--node_manager_port={nm2}" in _cmdline(p)
                              and "raylet" in _cmdline(p)]  # fmt: skip
                    orphans += _with_children(killed)  # its agents and workers: killed at the end
                    for p in killed:
                        os.kill(p, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert "2 node(s)" in out + err and len(killed) == 1 and done < 6  # killed mid-collection
        assert _dump(f"sqlite:///{db}") == reference
    finally:
        for p in [*_with_children(_marked(marker)), *orphans]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
