"""`autointerp run` and `autointerp status` as processes: SIGINT and SIGTERM stop cleanly with exit 130, `status`
reads a running job (text and JSON), and a job killed with SIGKILL at random points, then rerun, ends with the same
rows as an uninterrupted one, the units finished before each kill costing no LLM call again."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SPEECH = (
    "The state of the Union is strong. We will build roads, schools and hospitals in every State.\n\n"
    "In 1862 the Congress passed 37 acts; in 1863 it passed 41. Our nation's café owners pay 12 per cent.\n"
)


def write_config(tmp: Path, model: Path, db: Path, delay: float) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    cfg = tmp / f"job-{db.stem}.toml"
    cfg.write_text(
        f"""db = "sqlite:///{db}"
[model]
name = "{model}"
[corpus]
source = "{corpus}"
ctx_len = 24
max_tokens = 2000
[collect]
sites = ["blocks.1.mlp.post"]
batch_size = 8
top_k = 8
n_quantiles = 3
per_quantile = 2
n_random = 4
[explain]
llm = "fake"
features = "all"
limit = 8
chunk = 2
[score]
llm = "fake"
methods = ["detection", "fuzzing"]
max_per_role = 3
[intervene]
llm = "fake"
explainer = "llm"
target_kl = 0.05
n_prompts = 2
max_new_tokens = 4
[run]
explainers = ["llm", "tokens"]
poll_s = 0.05
heartbeat_s = 0.5
[llm.fake]
backend = "fake"
model = "scripted"
options = {{delay_s = "{delay}"}}
""",
        encoding="utf-8",
    )
    return cfg


def start(cfg: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autointerp.cli", "run", "--config", str(cfg), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result_rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = sqlite3.connect(db)
    q = {
        "explanation": "SELECT f.key, e.explainer, e.status, e.text FROM explanation e JOIN feature f ON "
        "f.id = e.feature_id",
        "score": "SELECT f.key, e.explainer, s.method, s.status, s.value FROM score s JOIN explanation e ON "
        "e.id = s.explanation_id JOIN feature f ON f.id = s.feature_id",
        "intervention": "SELECT f.key, i.status, i.strength, i.kl FROM intervention i JOIN feature f ON "
        "f.id = i.feature_id",
        "verdict": "SELECT f.key, e.explainer, v.verdict, v.reason FROM verdict v JOIN explanation e ON "
        "e.id = v.explanation_id JOIN feature f ON f.id = v.feature_id",
        "feature": "SELECT key, status, max_act, density FROM feature",
    }
    out = {k: sorted(con.execute(sql).fetchall()) for k, sql in q.items()}
    con.close()
    return out


def llm_calls(db: Path) -> int:
    con = sqlite3.connect(db)
    n = con.execute("SELECT count(*) FROM llm_call").fetchone()[0]
    con.close()
    return int(n)


@pytest.fixture()
def model(tmp_path: Path, tiny_gpt2_dir: Path) -> Path:
    dst = tmp_path / "tiny-gpt2"
    shutil.copytree(tiny_gpt2_dir, dst)
    return dst


@pytest.fixture()
def reference(tmp_path: Path, model: Path) -> tuple[Path, dict[str, Any], int]:
    """One uninterrupted job: its database, rows and LLM calls."""
    db = tmp_path / "ref.sqlite"
    proc = start(write_config(tmp_path, model, db, 0.0))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "run done" in err
    return db, result_rows(db), llm_calls(db)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_job_cleanly(tmp_path: Path, model: Path, reference: Any, sig: signal.Signals) -> None:
    ref_db, ref_rows, _ = reference
    db = tmp_path / "job.sqlite"
    cfg = write_config(tmp_path, model, db, 0.3)  # slow LLM calls: the signal lands inside a chunk
    proc = start(cfg)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the job has started its LLM stages
        time.sleep(0.3)
        if db.exists() and llm_calls(db) > 0:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted by {sig.name}" in err and "resume with the same command" in err
    con = sqlite3.connect(db)
    held = con.execute("SELECT count(*) FROM unit WHERE status = 'leased'").fetchone()[0]
    runs = dict(con.execute("SELECT stage, status FROM run WHERE stage != 'collect'").fetchall())
    con.close()
    assert held == 0 and set(runs.values()) == {"interrupted"}  # nothing left half-done or held
    again = start(cfg)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert result_rows(db) == ref_rows


@pytest.mark.slow
def test_status_while_a_job_runs_and_after(tmp_path: Path, model: Path) -> None:
    db = tmp_path / "job.sqlite"
    cfg = write_config(tmp_path, model, db, 0.1)
    proc = start(cfg, "--worker-name", "night-1")
    status = [sys.executable, "-m", "autointerp.cli", "status", "--config", str(cfg)]
    seen_running = False
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        if not db.exists():
            continue
        res = subprocess.run([*status, "--json"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0 or not res.stdout.strip():
            continue
        st = json.loads(res.stdout)
        stages = {s["stage"]: s for s in st["stages"]}
        if "explain" in stages and any(w["worker"] == "night-1" and w["alive"] for w in st["workers"]):
            seen_running = True
            assert set(st) >= {"stages", "spend", "workers", "errors", "window_s", "at", "schema"}
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert seen_running
    res = subprocess.run(status, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "done", "ok"]
    explain = next(line for line in lines if line.startswith("explain"))
    assert explain.split()[1] == "16" and explain.split()[5] == "0"  # 8 features x 2 explainers done, 0 pending
    assert any(line.startswith("LLM:") for line in lines)
    st = json.loads(subprocess.run([*status, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert not any(w["running"] for w in st["workers"]) and st["spend"]["calls"] == llm_calls(db)


@pytest.mark.slow
def test_kill_9_at_random_points_then_the_same_command(tmp_path: Path, model: Path, reference: Any) -> None:
    _, ref_rows, ref_calls = reference
    db = tmp_path / "job.sqlite"
    cfg = write_config(tmp_path, model, db, 0.02)
    rng = random.Random(int(os.environ.get("AUTOINTERP_KILL_SEED", "7")))
    kills = 0
    for _ in range(20):
        proc = start(cfg, "--worker-name", "w")  # the same name: a restarted worker takes its leases back at once
        time.sleep(rng.uniform(1.0, 9.0))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()[-3000:] if proc.stderr else ""
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
    final = start(cfg, "--worker-name", "w")
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    assert kills >= 5, f"only {kills} kills landed before the job ended: the job is too short for this test"
    assert result_rows(db) == ref_rows
    # Finished units cost no call again: only calls in flight at a kill can be made twice (their answers were
    # not in the response cache yet); at most one chunk per kill.
    per_chunk = 2 * 2 * 2 + 2  # the largest chunk: a score unit, 2 explanations x 2 scorers x up to 2 batches
    assert ref_calls <= llm_calls(db) <= ref_calls + kills * per_chunk


@pytest.mark.slow
def test_two_worker_processes_on_one_sqlite_database(tmp_path: Path, model: Path, reference: Any) -> None:
    """Two `autointerp run` processes at once: every unit done once, as many LLM calls as one worker makes, no
    "database is locked" reaching the user, and the rows of an uninterrupted single worker."""
    _, ref_rows, ref_calls = reference
    db = tmp_path / "job.sqlite"
    cfg = write_config(tmp_path, model, db, 0.05)
    first = start(cfg, "--worker-name", "a")
    time.sleep(4.0)  # the first one collects; the second waits for the collection, then they share the rest
    second = start(cfg, "--worker-name", "b")
    errs = []
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        errs.append(err)
        assert proc.returncode == 0, err[-3000:]
    assert not any("database is locked" in e for e in errs)
    con = sqlite3.connect(db)
    units = con.execute("SELECT worker, attempts FROM unit WHERE stage != 'collect'").fetchall()
    con.close()
    assert all(attempts == 1 for _w, attempts in units)
    assert {w for w, _a in units} == {"a", "b"}  # both did some of the work
    assert llm_calls(db) == ref_calls
    got = result_rows(db)
    for table, want in ref_rows.items():
        assert got[table] == want, (table, sorted(set(got[table]) ^ set(want))[:6])
