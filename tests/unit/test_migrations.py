"""Real old databases: each fixture in tests/fixtures/old_db was written by the code of the commit in its name
(make.sh there rebuilds them), and is opened, migrated and read by today's code; its JSON twin holds what the file
holds, read with sqlite3 alone. Plus the 4 -> 5 step (ALTER TABLE run ADD COLUMN) and the 5 -> 6 step (the
checkpoint table) on their own on SQLite; on both databases in tests/integration/test_migrations_postgres.py."""

from __future__ import annotations

import gzip
import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.store import SCHEMA_VERSION, open_store
from autointerp.store.migrations import add_column_sql, add_missing_columns, migrate, schema_drift
from autointerp.store.runs import start_run, worker_name
from autointerp.store.tables import CheckpointPart, Run, SchemaVersion, Unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "old_db"
NAMES = sorted(p.name.removesuffix(".sqlite.gz") for p in FIXTURES.glob("*.sqlite.gz"))
runner = CliRunner()


def test_every_schema_version_has_a_fixture() -> None:
    assert {int(n.split("-")[0].removeprefix("schema")) for n in NAMES} == set(range(1, SCHEMA_VERSION))


def _unpack(name: str, tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, dict[str, Any]]:
    db = tmp_path / f"{name}.sqlite"
    db.write_bytes(gzip.decompress((FIXTURES / f"{name}.sqlite.gz").read_bytes()))
    # The tiny model it was collected with lived in a temporary folder: the same tiny GPT-2, SmolLM2's tokenizer.
    con = sqlite3.connect(db)
    con.execute("UPDATE subject_model SET source = ?", (str(tokenizer_dir),))
    con.commit()
    con.close()
    return db, json.loads((FIXTURES / f"{name}.json").read_text())


def _cli(*args: str) -> Any:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else res.stdout


@pytest.mark.parametrize("name", NAMES)
def test_old_database_migrates_and_reads(tmp_path: Path, tiny_gpt2_dir: Path, name: str) -> None:
    db, want = _unpack(name, tmp_path, tiny_gpt2_dir)
    assert sqlite3.connect(db).execute("SELECT version FROM schema_version").fetchone()[0] == want["schema"]
    url = f"sqlite:///{db}"
    store = open_store(url)
    with store.session() as s:
        assert s.exec(select(SchemaVersion)).one().version == SCHEMA_VERSION
    assert schema_drift(store.engine) == []  # every column today's tables define, old tables included
    assert open_store(url).url == url  # a second open finds nothing to do

    rows = _cli("features", "list", "--db", url, "--json", "--all")
    assert len(rows) == want["features"] and sorted({r["source"] for r in rows}) == want["sources"]
    for kind in ("neuron", "latent"):
        if kind not in want:
            continue
        w = want[kind]
        got = _cli("features", "show", w["key"], "--db", url, "--json")
        assert {k: got[k] for k in ("max", "mean", "density", "n_tokens")} == {
            k: w[k] for k in ("max", "mean", "density", "n_tokens")
        }
        assert len(got["records"]) == w["records"]
        top0 = next(r for r in got["records"] if r["role"] == "top" and r["rank"] == 0)
        assert top0["max_act"] == w["top0"]["max_act"] and top0["acts"] == w["top0"]["acts"]
        assert len(top0["tokens"]) == len(w["top0"]["token_ids"]) and all(isinstance(t, str) for t in top0["tokens"])
        assert _cli("features", "show", w["key"], "--db", url).startswith(w["key"])

    by_feature: dict[str, dict[str, Counter[Any]]] = {}
    for table, fields in (
        ("explanations", ("explainer", "status", "text")),
        ("scores", ("method", "status", "value", "explanation")),
        ("verdicts", ("verdict", "explanation")),
    ):
        for row in want.get(table, []):
            got_rows = by_feature.setdefault(row["feature"], {}).setdefault(table, Counter())
            got_rows[tuple(row[f] for f in fields)] += 1
    assert bool(by_feature) == ("explanations" in want)
    for key, tables in by_feature.items():
        got = _cli("features", "show", key, "--db", url, "--json")
        assert Counter((e["explainer"], e["status"], e["text"]) for e in got["explanations"]) == tables["explanations"]
        if "scores" in tables:
            assert (
                Counter((s["method"], s["status"], s["value"], s["explanation"]) for s in got["scores"])
                == tables["scores"]
            )
        if "verdicts" in tables:
            assert Counter((v["verdict"], v["explanation"]) for v in got["verdicts"]) == tables["verdicts"]
            assert got["direct_effects"] is not None
    if "scores" in want:
        _cli("features", "list", "--db", url, "--sort", "score", "--method", "embedding")

    if "units" in want:  # the job runner's units (schema 5) kept as they were
        with store.session() as s:
            units = Counter((u.stage, u.status, u.outcome) for u in s.exec(select(Unit)).all())
        assert units == {(u["stage"], u["status"], u["outcome"]): u["n"] for u in want["units"]}
    run_id = start_run(store, "explain", {}, total=1)  # today's code writes the migrated run table
    with store.session() as s:
        new = s.get(Run, run_id)
        old = s.exec(select(Run).where(Run.id != run_id).order_by(col(Run.id))).all()
    assert new is not None and new.worker == worker_name() and new.heartbeat_at is not None
    assert old and all(r.status == "done" for r in old)  # old rows kept as they were
    workers = [r["worker"] for r in want["runs"]] if "runs" in want else [None] * len(old)
    assert [r.worker for r in old] == workers


def _run_columns(db: Path) -> set[str]:
    return {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(run)")}


def test_v4_to_v5_adds_the_run_columns(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    db, _ = _unpack("schema4-a1ec84b", tmp_path, tiny_gpt2_dir)
    before = sqlite3.connect(db).execute("SELECT id, stage, key, status, counts FROM run ORDER BY id").fetchall()
    assert not {"worker", "heartbeat_at"} & _run_columns(db)
    open_store(f"sqlite:///{db}")
    assert {"worker", "heartbeat_at"} <= _run_columns(db)
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, stage, key, status, counts FROM run ORDER BY id").fetchall() == before
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_add_column_ddl_is_plain_sql_for_sqlite_and_postgresql() -> None:
    worker, heartbeat = Run.__table__.c.worker, Run.__table__.c.heartbeat_at  # type: ignore[attr-defined]
    assert add_column_sql(worker, sqlite.dialect()) == "ALTER TABLE run ADD COLUMN worker VARCHAR"
    assert add_column_sql(heartbeat, sqlite.dialect()) == "ALTER TABLE run ADD COLUMN heartbeat_at DATETIME"
    assert add_column_sql(worker, postgresql.dialect()) == "ALTER TABLE run ADD COLUMN worker VARCHAR"
    pg = add_column_sql(heartbeat, postgresql.dialect())
    assert pg == "ALTER TABLE run ADD COLUMN heartbeat_at TIMESTAMP WITH TIME ZONE"


def test_a_step_adds_only_the_columns_missing(tmp_path: Path, as_schema_v4: Any) -> None:
    url = f"sqlite:///{tmp_path}/m.sqlite"
    as_schema_v4(url)
    con = sqlite3.connect(tmp_path / "m.sqlite")
    con.execute("ALTER TABLE run ADD COLUMN worker VARCHAR")  # e.g. added by hand, or by a step cut off elsewhere
    con.commit()
    con.close()
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        assert add_missing_columns(conn, Run.__table__, ("worker", "heartbeat_at")) == ["heartbeat_at"]  # type: ignore[attr-defined]
    migrate(engine, 4, SCHEMA_VERSION)  # the version is 4 still: the step runs, and finds nothing to add
    assert schema_drift(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION


def test_a_process_that_migrates_late_skips_the_steps_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_schema_v4: Any
) -> None:
    """Two processes opening one old database at once: the second, having read version 4 before the first
    finished, must not run the 4 -> 5 step again (steps need not be idempotent)."""
    from autointerp.store import migrations

    url = f"sqlite:///{tmp_path}/m.sqlite"
    as_schema_v4(url)
    ran: list[int] = []
    monkeypatch.setitem(migrations.MIGRATIONS, 4, lambda conn: ran.append(4))
    store = open_store(url)  # the first process
    assert ran == [4]
    migrate(store.engine, 4, SCHEMA_VERSION)  # the second, late
    assert ran == [4]


def test_v5_to_v6_adds_the_checkpoint_table(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    db, want = _unpack("schema5-6e4a3ff", tmp_path, tiny_gpt2_dir)
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    features = con.execute("SELECT key, n_tokens, histogram FROM feature ORDER BY id").fetchall()
    con.close()
    assert "checkpoint" not in tables and want["schema"] == 5
    store = open_store(f"sqlite:///{db}")
    with store.session() as s:
        assert s.exec(select(CheckpointPart)).all() == []
    con = sqlite3.connect(db)
    assert con.execute("SELECT key, n_tokens, histogram FROM feature ORDER BY id").fetchall() == features
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] == 6
