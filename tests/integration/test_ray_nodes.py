"""Ray across nodes: a real two-node cluster on this machine, one node killed mid-collection. In a module of its
own, so that no other Ray cluster of the tests runs beside it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")


def _short_dir() -> str:
    # Ray's session holds unix sockets, whose paths are limited to ~107 bytes: pytest's temp paths can be too long
    return tempfile.mkdtemp(prefix="ray-", dir="/tmp")


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
def test_two_nodes_one_killed_mid_collection(
    tmp_path: Path, crash_collection: Any, reference: Any, collection_rows: Any
) -> None:
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

    def own_ports() -> list[str]:  # each node's agents on ports of its own (defaults clash with other clusters)
        flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--object-manager-port")  # fmt: skip
        return [x for f in flags for x in (f, str(_free_port()))]

    orphans: list[int] = []
    try:
        for args in (["--head", "--port", str(port), "--node-manager-port", str(nm1), "--include-dashboard=false",
                      "--temp-dir", _short_dir()],
                     ["--address", f"127.0.0.1:{port}", "--node-manager-port", str(nm2)]):  # fmt: skip
            started = subprocess.run([ray_bin, "start", *args, *common, *own_ports()], env=env, capture_output=True,
                                     text=True, timeout=120)  # fmt: skip
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
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
        assert collection_rows(f"sqlite:///{db}") == reference
    finally:
        for p in [*_with_children(_marked(marker)), *orphans]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
