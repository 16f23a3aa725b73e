"""`autointerp run` and `autointerp status` as processes: SIGINT and SIGTERM stop cleanly with exit 130, `status`
reads a running job (text and JSON), and a job killed with SIGKILL at random points, then rerun, ends with the same
rows as an uninterrupted one, the units finished before each kill costing no LLM call again."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
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


def write_config(tmp: Path, model: Path, db: Path | str, delay: float, grace_s: float = 300.0) -> Path:
    """The job's config; `db` a SQLite file or a database URL (PostgreSQL)."""
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text((SPEECH * (3 + i)).replace("1862", str(1800 + 7 * i)), encoding="utf-8")
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    cfg = tmp / f"job-{url.rsplit('/', 1)[-1].split('.')[0]}.toml"
    cfg.write_text(
        f"""db = "{url}"
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
grace_s = {grace_s}
[llm.fake]
backend = "fake"
model = "scripted"
options = {{delay_s = "{delay}"}}
""",
        encoding="utf-8",
    )
    return cfg


def start(cfg: Path, *extra: str, log: Any = None) -> subprocess.Popen[str]:
    """`autointerp run` as a process; its output piped (read it with communicate), or into the open file `log`
    for a process that is never read (a full pipe would block it)."""
    out = subprocess.PIPE if log is None else log
    return subprocess.Popen(
        [sys.executable, "-m", "autointerp.cli", "run", "--config", str(cfg), *extra],
        stdout=out,
        stderr=out,
        text=True,
    )


def _query(db: Path | str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on a SQLite file or a database URL (read with SQLAlchemy, so on PostgreSQL too)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db if isinstance(db, str) else f"sqlite:///{db}")
    try:
        with engine.connect() as con:
            return [tuple(r) for r in con.execute(text(sql)).all()]
    finally:
        engine.dispose()


def result_rows(db: Path | str) -> dict[str, list[tuple[Any, ...]]]:
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
        "record": "SELECT f.key, r.role, r.split, r.rank, r.max_act, c.idx FROM record r JOIN feature f ON "
        "f.id = r.feature_id JOIN context c ON c.id = r.context_id",
    }
    return {k: sorted(_query(db, sql)) for k, sql in q.items()}


def llm_calls(db: Path | str) -> int:
    return int(_query(db, "SELECT count(*) FROM llm_call")[0][0])


def calling(db: Path) -> bool:
    """The job has made an LLM call (its database may not exist yet, or be halfway through its first set-up)."""
    from sqlalchemy.exc import OperationalError

    try:
        return db.exists() and llm_calls(db) > 0
    except OperationalError:  # no such table yet
        return False


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
        if calling(db):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted by {sig.name}" in err and "resume with the same command" in err
    held = _one(db, "SELECT count(*) FROM unit WHERE status = 'leased'")
    runs = {r[0] for r in _query(db, "SELECT status FROM run WHERE stage != 'collect'")}
    assert held == 0 and runs == {"interrupted"}  # nothing left half-done or held
    again = start(cfg)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert result_rows(db) == ref_rows


@pytest.mark.slow
@pytest.mark.parametrize("how", ["twice", "grace"])
def test_a_second_signal_or_the_end_of_the_grace_period_stops_at_once(tmp_path: Path, model: Path,
                                                                     reference: Any, how: str) -> None:  # fmt: skip
    """A second Ctrl-C, or a chunk still running when the grace period ends, stops the job at once: exit 130, the
    units in flight given back (none left held), and the same command finishes with an uninterrupted job's rows."""
    _, ref_rows, _ = reference
    db = tmp_path / "job.sqlite"
    # a call takes 3 s, so a chunk is in flight at each signal; 'grace': the grace period is 1 s, too short for it
    cfg = write_config(tmp_path, model, db, 3.0, grace_s=1.0 if how == "grace" else 300)
    proc = start(cfg)
    # the first chunk's calls are logged when it ends; the next chunk is then in flight for 3 s
    assert _wait_for(proc, lambda: _one(db, "SELECT count(*) FROM llm_call"), 120), "no LLM call was made"
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    if how == "twice":
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted by SIGINT: finishing the units in flight" in err and "stopped at once" in err, err[-3000:]
    assert time.time() - t0 < 30  # not the 300 s grace period, nor the rest of the job
    held = _one(db, "SELECT count(*) FROM unit WHERE status = 'leased'")
    runs = {r[0] for r in _query(db, "SELECT status FROM run WHERE stage != 'collect'")}
    assert held == 0 and runs == {"interrupted"}
    cfg = write_config(tmp_path, model, db, 0.0)
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
    # --watch refreshes until Ctrl-C, which ends it with exit 0
    watch = subprocess.Popen([*status, "--watch", "--every", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    time.sleep(4.0)  # start-up, then about a dozen refreshes
    watch.send_signal(signal.SIGINT)
    shown, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err[-2000:]
    assert shown.count("workers alive:") >= 3 and "Traceback" not in err, (shown[-500:], err[-500:])


def _one(db: Path, sql: str) -> Any:
    """One value from the job's SQLite database while the job writes (WAL: readers never wait), or None before
    the database or its tables exist."""
    if not db.exists():
        return None  # connecting would create an empty file under the job
    try:
        return _query(db, sql)[0][0]
    except Exception:  # noqa: BLE001 (a table not created yet)
        return None


COLLECTING = "SELECT count(*) FROM unit WHERE stage = 'collect' AND status = 'leased'"


def _wait_for(proc: subprocess.Popen[str], ready: Any, timeout: float) -> bool:
    """Poll `ready` until it holds (True) or `timeout` passes (False); the job must not end meanwhile."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the process ended while it was waited on"
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_kill_9_at_20_points_in_every_stage_then_the_same_command(tmp_path: Path, model: Path,
                                                                   reference: Any) -> None:  # fmt: skip
    """SIGKILL at 20 points, each a random moment after a new LLM call is logged (inside a chunk or between two):
    the first while collecting, the next three while explaining, scoring and checking, then anywhere; each time
    the same command is started again, and at the end it runs to completion. The rows equal an uninterrupted
    job's (records too), and only calls in flight at a kill are made again."""
    _, ref_rows, ref_calls = reference
    db = tmp_path / "job.sqlite"
    cfg = write_config(tmp_path, model, db, 0.1)  # 0.1 s a call: the job's 100 calls outlast the 20 kills
    rng = random.Random(int(os.environ.get("AUTOINTERP_KILL_SEED", "7")))
    landed: list[str] = []
    order = ("explain", "score", "intervene")
    log = (tmp_path / "kills.log").open("w")
    for k in range(20):
        last_call = _one(db, "SELECT max(id) FROM llm_call") or 0
        proc = start(cfg, "--worker-name", "w", log=log)  # the same name: a restarted worker frees its leases
        if k == 0:
            assert _wait_for(proc, lambda: _one(db, COLLECTING), 120), "the collection never started"
            stage = "collect"
        else:
            # the next three kills during a call of explain, of score, then of intervene (a stage that has no
            # call left: any stage), the others once any new call is logged
            stage = order[k - 1] if k <= len(order) else "%"
            new_call = "SELECT max(stage) FROM llm_call WHERE id > {} AND stage LIKE '{}'"
            own, anyone = new_call.format(last_call, stage), new_call.format(last_call, "%")
            if not _wait_for(proc, lambda q=own: _one(db, q), 30):
                assert _wait_for(proc, lambda q=anyone: _one(db, q), 60), f"kill {k}: no call"
                stage = "%"
        time.sleep(rng.uniform(0.0, 0.05))  # inside that call's chunk, or just after it
        if stage == "%":
            stage = str(_one(db, "SELECT stage FROM llm_call ORDER BY id DESC"))
        landed.append(stage)
        assert proc.poll() is None, f"the job ended before kill {k} ({landed})"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    log.close()
    final = start(cfg, "--worker-name", "w")
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    assert {"collect", "explain", "score", "intervene"} <= set(landed), landed
    got = result_rows(db)
    for table, want in ref_rows.items():
        assert got[table] == want, (table, sorted(set(got[table]) ^ set(want))[:6])
    # Finished units cost no call again (their answers are in the response cache): only a call in flight at a
    # kill, at most `concurrency` (4) of them, is made twice.
    assert ref_calls <= llm_calls(db) <= ref_calls + 4 * len(landed), (llm_calls(db), ref_calls)


def _two_processes(tmp_path: Path, model: Path, reference: Any, db: Path | str) -> None:
    """Two `autointerp run` processes at once on `db`: every unit done once, as many LLM calls as one worker
    makes, no "database is locked" reaching the user, and the rows of an uninterrupted single worker."""
    _, ref_rows, ref_calls = reference
    cfg = write_config(tmp_path, model, db, 0.05)
    first = start(cfg, "--worker-name", "a")
    time.sleep(4.0)  # the first one collects; the second waits for the collection, then they share the rest
    second = start(cfg, "--worker-name", "b")
    errs = []
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        errs.append(err)
        assert proc.returncode == 0, err[-3000:]
    assert not any("database is locked" in e or "Traceback" in e for e in errs)
    units = _query(db, "SELECT worker, attempts FROM unit WHERE stage != 'collect'")
    assert all(attempts == 1 for _w, attempts in units)
    assert {w for w, _a in units} == {"a", "b"}  # both did some of the work
    assert llm_calls(db) == ref_calls
    got = result_rows(db)
    for table, want in ref_rows.items():
        assert got[table] == want, (table, sorted(set(got[table]) ^ set(want))[:6])


@pytest.mark.slow
def test_two_worker_processes_on_one_sqlite_database(tmp_path: Path, model: Path, reference: Any) -> None:
    _two_processes(tmp_path, model, reference, tmp_path / "job.sqlite")


@pytest.mark.slow
def test_two_worker_processes_on_one_postgresql_database(tmp_path: Path, model: Path, reference: Any,
                                                         postgres_db: str) -> None:  # fmt: skip
    """The same on a real PostgreSQL server: claims under FOR UPDATE SKIP LOCKED, the collection's checkpoint and
    its bulk writes (COPY) in the database."""
    _two_processes(tmp_path, model, reference, postgres_db)
