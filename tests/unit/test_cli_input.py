"""What the CLI does with what a user types that is not a flag's value: where `export --out` writes, which
database a command opens (never a new one by mistake, a read-only one refused clearly), config files that cannot
be read, feature ids with LIKE's wildcards, `status` figures, the help text and the GGUF conversion's bar."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def db_file(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


# ------------------------------------------------------------------------------------------------- export --out


def test_export_into_a_regular_file_keeps_its_mode_and_a_new_one_gets_the_umask(
    collected_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    run_cli: Any,
) -> None:
    where = tmp_path / "exports"
    where.mkdir()
    old = where / "old.jsonl"
    old.write_text("old\n", encoding="utf-8")
    old.chmod(0o640)
    code, text = run_cli(["export", "--db", collected_db, "--out", str(old)])
    assert code == 0, text
    assert stat.S_IMODE(old.stat().st_mode) == 0o640 and old.read_text(encoding="utf-8").startswith('{"id"')
    mask = os.umask(0o022)
    try:
        new = where / "new.jsonl"
        code, text = run_cli(["export", "--db", collected_db, "--out", str(new)])
    finally:
        os.umask(mask)
    assert code == 0 and stat.S_IMODE(new.stat().st_mode) == 0o644, text  # not mkstemp's 0600
    assert sorted(p.name for p in where.iterdir()) == ["new.jsonl", "old.jsonl"]  # no temporary file left


def test_export_through_a_symlink_writes_its_target(
    collected_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    code, text = run_cli(["export", "--db", collected_db, "--out", str(link)])
    assert code == 0, text
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text(encoding="utf-8").startswith('{"id"')


def test_export_into_a_fifo_streams_and_leaves_it_a_fifo(
    collected_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, text = run_cli(["export", "--db", collected_db, "--out", str(fifo)])
    reader.join(timeout=30)
    assert code == 0, text
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert got and got[0].count(b"\n") == len(got[0].splitlines()) > 10


@pytest.fixture()
def devices(tmp_path: Path) -> dict[str, Path]:
    """Character devices of our own (null and full), so that a broken export never touches /dev's."""
    found = {}
    for name, minor in (("null", 3), ("full", 7)):
        try:
            os.mknod(tmp_path / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        except OSError:
            pytest.skip("cannot make device nodes here (not root)")
        found[name] = tmp_path / name
    return found


def test_export_into_a_character_device_writes_it_in_place(
    collected_db: str,
    devices: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    run_cli: Any,
) -> None:
    code, text = run_cli(["export", "--db", collected_db, "--out", str(devices["null"])])
    assert code == 0, text
    assert stat.S_ISCHR(devices["null"].stat().st_mode)
    code, text = run_cli(["export", "--db", collected_db, "--out", str(devices["full"])])
    assert code == 2 and "error:" in text and str(devices["full"]) in text and "No space left" in text, text
    assert "Traceback" not in text and stat.S_ISCHR(devices["full"].stat().st_mode)


def test_export_to_dash_is_standard_output(
    collected_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_main: Any
) -> None:
    code, out, err = run_main(["export", "--db", collected_db, "--out", "-"])
    assert code == 0 and out.startswith('{"id"') and not Path("-").exists(), err


@pytest.mark.parametrize("out", ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"])
def test_export_to_standard_output_by_name_appends_where_the_shell_points_it(
    collected_db: str, tmp_path: Path, out: str
) -> None:
    """`export --out /dev/stdout >> log`: the log keeps what it held, and a pipe gets the lines (by name, these lead
    to the descriptor as the shell opened it, not to a file to replace or truncate)."""
    log = tmp_path / "log.txt"
    log.write_text("prior\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "autointerp.cli", "export", "--db", collected_db, "--out", out]
    with log.open("a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "prior" and len(lines) > 1 and lines[1].startswith('{"id"')
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith('{"id"'), piped.stderr


def test_a_failed_export_leaves_the_old_file_as_it_was(
    collected_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autointerp.query import export as export_mod
    from autointerp.store import open_store

    (tmp_path / "exports").mkdir()
    old = tmp_path / "exports" / "out.jsonl"
    old.write_text("the old export\n", encoding="utf-8")
    real = export_mod.feature_objects

    def fails_midway(*a: Any, **k: Any) -> Iterator[dict[str, Any]]:
        for i, obj in enumerate(real(*a, **k)):
            if i == 5:
                raise OSError(28, "No space left on device")
            yield obj

    monkeypatch.setattr(export_mod, "feature_objects", fails_midway)
    from autointerp.store.search import QueryError

    with pytest.raises(QueryError, match="No space left"):
        export_mod.export_to_file(open_store(collected_db), old)
    assert old.read_text(encoding="utf-8") == "the old export\n"
    assert [p.name for p in old.parent.iterdir()] == ["out.jsonl"]


# ------------------------------------------------------------------------------------------------- which database


@pytest.mark.parametrize("command", [["features", "list"], ["status"], ["export"], ["usage"], ["review"]])
def test_read_commands_never_create_a_database(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    run_cli: Any,
) -> None:
    where = tmp_path / "no" / "such" / "x.sqlite"
    code, text = run_cli([*command, "--db", f"sqlite:///{where}"])
    assert code == 2 and f"no database at {where}" in text and f"{tmp_path / 'no'} does not exist" in text, text
    assert not (tmp_path / "no").exists()
    zero = tmp_path / "zero.sqlite"
    zero.touch()
    code, text = run_cli([*command, "--db", f"sqlite:///{zero}"])
    assert code == 2 and "is an empty file, not a database" in text and zero.stat().st_size == 0, text
    code, text = run_cli([*command, "--db", "sqlite:///"])
    assert code == 2 and "names no file" in text, text


def test_a_sqlite_file_of_another_application_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    import sqlite3

    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    before = digest(other)
    code, text = run_cli(["features", "list", "--db", f"sqlite:///{other}"])
    assert code == 2 and "not autointerp's" in text and digest(other) == before, text


def test_run_without_collect_on_a_missing_database_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    where = tmp_path / "x.sqlite"
    code, text = run_cli(["run", "--stages", "explain,score", "--db", f"sqlite:///{where}"])
    assert code == 2 and f"no database at {where}" in text and "collect" in text, text
    assert not where.exists()


def test_a_command_that_collects_says_it_created_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from autointerp.cli import _store

    where = tmp_path / "sub" / "new.sqlite"
    _store(f"sqlite:///{where}", create=True)
    assert f"created new database {where}" in capsys.readouterr().err and where.exists()
    _store(f"sqlite:///{where}", create=True)
    assert "created" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- read-only


def make_read_only(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """From here on, SQLite opens the database of `url` read-only (mode=ro), as it opens a file it may not write:
    root, which these tests run as, writes any file whatever its mode. What earlier connections left in the WAL is
    checkpointed first (so that their closing later changes nothing)."""
    import gc
    import sqlite3

    gc.collect()  # the engines of the commands run before: their connections close now, not during the test
    target = str(db_file(url))
    con = sqlite3.connect(target)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    connect = sqlite3.connect

    def read_only(database: Any, *a: Any, **k: Any) -> Any:
        if database == target:
            return connect(f"file:{database}?mode=ro", *a, **(k | {"uri": True}))
        return connect(database, *a, **k)

    monkeypatch.setattr(sqlite3.dbapi2, "connect", read_only)  # what SQLAlchemy's driver calls


def _explained(url: str) -> None:
    from autointerp.config import load_config
    from autointerp.explain.run import build_explainer, run_explain
    from autointerp.store import open_store

    cfg = load_config(None, {"db": url, "explain.limit": 4})
    store = open_store(url)
    run_explain(cfg, store, explainer=build_explainer(cfg, store, kind="tokens"))
    store.engine.dispose()


@pytest.mark.parametrize(
    "args",
    [
        ["explain", "--explainer", "tokens", "--limit", "2"],
        ["run", "--stages", "explain", "--config", "{tokens_only}"],
        ["score", "--method", "embedding"],
        ["search", "--semantic", "numbers"],
    ],
)
def test_a_read_only_database_is_named_not_a_traceback(
    args: list[str],
    collected_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    run_cli: Any,
) -> None:
    tokens_only = tmp_path / "tokens.toml"  # no LLM loads, should the refusal come too late
    tokens_only.write_text('[run]\nexplainers = ["tokens"]\n', encoding="utf-8")
    args = [a.format(tokens_only=tokens_only) for a in args]
    if args[0] == "search":
        _explained(collected_db)  # explanations without embeddings: the search would store them
    run_cli(["features", "list", "--db", collected_db])  # the query indexes made, as a reader finds
    make_read_only(monkeypatch, collected_db)
    before = digest(db_file(collected_db))
    code, text = run_cli([*args, "--db", collected_db])
    assert "Traceback" not in text and "sqlalche.me" not in text, text
    assert f"database {db_file(collected_db)} is read-only" in text, text
    if args[0] == "search":  # it searches what is embedded, and says what it could not embed
        assert code == 0 and "have no embedding yet" in text and "cannot be stored here" in text, text
    else:
        assert code == 2, text
    assert digest(db_file(collected_db)) == before


def test_a_read_only_database_still_answers_the_read_commands(
    collected_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    run_cli(["features", "list", "--db", collected_db])  # the query indexes made, as a reader finds
    make_read_only(monkeypatch, collected_db)
    for args in (["features", "list", "--limit", "2"], ["status"], ["features", "show", "neurons/1"]):
        code, text = run_cli([*args, "--db", collected_db])
        assert code == 0, (args, text)


def test_a_read_only_mount_is_refused_clearly(collected_db_file: Path, tmp_path: Path) -> None:
    """The real thing where this machine allows it: the database file bind-mounted read-only in a private mount
    namespace (root in a container with CAP_SYS_ADMIN), the CLI run there."""
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare")
    db = tmp_path / "db.sqlite"
    shutil.copy(collected_db_file, db)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("cannot make a mount namespace here")
    cmd = (f"mount --bind -o ro {db} {db} && {sys.executable} -m autointerp.cli explain --explainer tokens "
           f"--limit 2 --db sqlite:///{db}")  # fmt: skip
    res = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 2, res.stderr
    assert f"error: database {db} is read-only" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------------------------------- feature ids


def test_like_wildcards_in_an_id_are_characters(
    collected_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    code, text = run_cli(["features", "show", "_eurons/11", "--db", collected_db])
    assert code == 2 and "no feature '_eurons/11'" in text, text
    code, text = run_cli(["features", "show", "%", "--db", collected_db])
    assert code == 2 and "no feature '%'" in text and "ambiguous" not in text, text
    code, text = run_cli(["features", "show", "neurons/11", "--db", collected_db, "--json"])
    assert code == 0 and json.loads(text[text.index("{") :])["index"] == 11, text


def test_features_list_limit_is_a_number_of_rows(
    collected_db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], run_cli: Any
) -> None:
    code, text = run_cli(["features", "list", "--db", collected_db, "--limit", "3", "--json"])
    assert code == 0 and len(json.loads(text)) == 3, text
    code, text = run_cli(["features", "list", "--db", collected_db, "--all", "--json"])
    assert code == 0 and len(json.loads(text)) == 128, text  # every feature of the tiny model's mlp.post
    code, text = run_cli(["features", "list", "--db", collected_db, "--site", "blocks.9.mlp.post"])
    assert code == 2 and "no feature has site 'blocks.9.mlp.post'" in text and "blocks.1.mlp.post" in text, text


# ------------------------------------------------------------------------------------------------- status


def _feature_ids(store: Any, n: int) -> list[int]:
    from sqlmodel import select

    from autointerp.store.tables import Feature

    with store.session() as s:
        return list(s.exec(select(Feature.id).order_by(Feature.id).limit(n)).all())


def test_status_rate_is_over_the_time_the_job_ran_and_no_eta_when_done(collected_db: str) -> None:
    from autointerp.cli.render import status_lines
    from autointerp.run.status import job_status
    from autointerp.store import open_store
    from autointerp.store.tables import Run, Unit, utcnow

    store = open_store(collected_db)
    now = utcnow()
    ids = _feature_ids(store, 20)
    with store.session() as s:
        # explain: 10 units done in 20 s, a minute ago; nothing left. score: 10 done in 20 s, 10 left, still running
        t0 = now - timedelta(seconds=80)
        s.add(Run(stage="explain", key="e", config={}, total=10, worker="w", status="done", started_at=t0,
                  finished_at=t0 + timedelta(seconds=20), heartbeat_at=t0 + timedelta(seconds=20)))  # fmt: skip
        s.add(Run(stage="score", key="s", config={}, total=20, worker="w", status="running",
                  started_at=now - timedelta(seconds=20), heartbeat_at=now))  # fmt: skip
        for i in range(10):
            s.add(Unit(stage="explain", identity="x", feature_id=ids[i], status="done",
                       updated_at=t0 + timedelta(seconds=2 * (i + 1))))  # fmt: skip
            s.add(Unit(stage="score", identity="y", feature_id=ids[i], status="done",
                       updated_at=now - timedelta(seconds=18 - 2 * i)))  # fmt: skip
            s.add(Unit(stage="score", identity="y", feature_id=ids[10 + i], status="pending"))
        s.commit()
    st = job_status(store, window_s=600.0, alive_s=90.0)
    by = {x.stage: x for x in st.stages}
    assert by["explain"].per_minute == pytest.approx(30.0, rel=0.01)  # 10 in 20 s, not 10 in 10 minutes
    assert by["explain"].eta_s is None  # nothing left: no ETA (not 0, not hours)
    assert by["score"].per_minute == pytest.approx(30.0, rel=0.05)
    assert by["score"].eta_s == pytest.approx(20.0, rel=0.05)  # 10 left at 30 a minute
    explain_line = next(line for line in status_lines(st) if line.startswith("explain"))
    assert explain_line.split()[-1] == "-"


def test_a_worker_finishing_its_units_after_a_signal_is_alive(collected_db: str) -> None:
    """After a first SIGTERM the job closes its runs as interrupted but still finishes the units it holds, its
    heartbeat renewing their leases: it is alive, not silent or gone."""
    from autointerp.cli.render import status_lines
    from autointerp.run.status import job_status
    from autointerp.store import open_store
    from autointerp.store.tables import Run, Unit, utcnow

    store = open_store(collected_db)
    now = utcnow()
    long_ago = now - timedelta(seconds=600)
    (fid,) = _feature_ids(store, 1)
    with store.session() as s:
        s.add(Run(stage="explain", key="e", config={}, total=1, worker="night-1", status="interrupted",
                  started_at=long_ago, finished_at=long_ago, heartbeat_at=long_ago))  # fmt: skip
        s.add(Unit(stage="explain", identity="x", feature_id=fid, status="leased", worker="night-1",
                   heartbeat_at=now - timedelta(seconds=5), lease_expires_at=now + timedelta(seconds=60)))  # fmt: skip
        s.commit()
    st = job_status(store, alive_s=90.0)
    (night,) = [w for w in st.workers if w["worker"] == "night-1"]
    assert night["alive"] and night["running"]
    assert any(line.startswith("workers alive:") and "night-1" in line for line in status_lines(st))


# ------------------------------------------------------------------------------------------------- output


def _help_texts() -> dict[str, str]:
    import typer.main
    from typer.testing import CliRunner

    from autointerp.cli import app

    def walk(cmd: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        if hasattr(cmd, "commands"):
            return [p for name, c in cmd.commands.items() for p in walk(c, (*path, name))]
        return [path]

    runner = CliRunner()
    out = {}
    for path in walk(typer.main.get_command(app), ()):
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        out[" ".join(path)] = res.output
    return out


def test_every_help_keeps_its_bracketed_names() -> None:
    """Each `[...]` written in an option's help or a command's docstring is printed (rich markup would take it
    for a style tag and print nothing)."""
    import re

    import typer.main

    from autointerp.cli import app

    texts = _help_texts()
    root = typer.main.get_command(app)
    checked = 0
    for name, output in texts.items():
        cmd: Any = root
        for part in name.split():
            cmd = cmd.commands[part]
        written = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for bracket in {b for w in written for b in re.findall(r"\[[^\]\s]+\]", w)}:
            assert bracket in output, (name, bracket, output)
            checked += 1
    assert checked >= 3  # explain's, score's and intervene's [llm.NAME] at least
    assert "Name of an [llm.NAME] config block" in texts["explain"]


def test_the_gguf_conversion_bar_follows_transformers_progress_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging

    import autointerp.subject.model as model
    from autointerp.subject import files

    def fake_convert(_gguf: Path, out: Path) -> None:  # what transformers' loader draws while it converts
        for _ in gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}", encoding="utf-8")

    monkeypatch.setattr(model, "gguf_to_safetensors", fake_convert)
    monkeypatch.setenv("AUTOINTERP_HOME", str(tmp_path / "home"))
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(64))
    logging.disable_progress_bar()
    try:
        files.materialize(files.ResolvedModel("m", weights))
    finally:
        logging.enable_progress_bar()
    assert "de-quantizing" not in capsys.readouterr().err
    weights.write_bytes(b"GGUF" + bytes(65))  # another file: converted again, bars on this time
    files.materialize(files.ResolvedModel("m", weights))
    assert "de-quantizing" in capsys.readouterr().err
