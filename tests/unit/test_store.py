"""The store on SQLite alone: blob round trips (Hypothesis), the schema version, the checks of SQLite files, a clear
error for a bad URL, workers opening a new database at once. What must hold on both databases is tested on both in
tests/integration/test_store_postgres.py."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlmodel import select

from autointerp.store import SCHEMA_VERSION, StoreError, open_store
from autointerp.store.blobs import pack_f16, pack_i32, unpack_f16, unpack_i32
from autointerp.store.tables import Context, SchemaVersion

f16_values = st.floats(min_value=-60000, max_value=60000, allow_nan=False, width=16)


@given(st.lists(f16_values, max_size=300))
def test_f16_blob_round_trip(values: list[float]) -> None:
    arr = np.asarray(values, dtype=np.float32)
    np.testing.assert_array_equal(unpack_f16(pack_f16(arr)), arr)


@given(st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=300))
def test_i32_blob_round_trip(ids: list[int]) -> None:
    assert unpack_i32(pack_i32(np.asarray(ids, dtype=np.int64))).tolist() == ids


def test_i32_blob_refuses_overflow() -> None:
    with pytest.raises(ValueError):
        pack_i32(np.asarray([2**40]))


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_schema_version_recorded_and_newer_refused_untouched(tmp_path: Path, journal: str) -> None:
    db = tmp_path / "v.sqlite"
    store = open_store(f"sqlite:///{db}")
    with store.session() as s:
        row = s.exec(select(SchemaVersion)).one()
        assert row.version == SCHEMA_VERSION
    store.engine.dispose()
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.execute("DROP TABLE llm_cache")  # a newer schema may have dropped a table: it must not come back
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute(f"PRAGMA journal_mode={journal}")  # delete: our connect hook would switch it to WAL (a write)
    con.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{db}")
    assert str(info.value).startswith(f"{db}: schema version {SCHEMA_VERSION + 1} is newer than this autointerp's")
    assert f"({SCHEMA_VERSION})" in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # byte-identical, no -wal or -shm made


def test_corrupt_sqlite_files_are_store_errors_naming_the_file(tmp_path: Path, tiny_store: Any) -> None:
    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(rng.bytes(5000))
    with pytest.raises(StoreError, match=f"^{re.escape(str(junk))}: not a SQLite database"):
        open_store(f"sqlite:///{junk}")
    assert not (tmp_path / "junk.sqlite-wal").exists()

    real = tmp_path / "real.sqlite"
    tiny_store(f"sqlite:///{real}", n_ctx=400, ctx_len=64)[0].engine.dispose()
    con = sqlite3.connect(real)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = real.read_bytes()
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        StoreError, match=rf"^{re.escape(str(cut))}: truncated: {len(data) // 2} bytes, its header says"
    ):
        open_store(f"sqlite:///{cut}")

    # A damaged page inside (header and size intact) shows at the first query that reads it.
    page = int.from_bytes(data[16:18], "big")
    root = sqlite3.connect(real).execute("SELECT rootpage FROM sqlite_master WHERE name = 'context'").fetchone()[0]
    hurt = tmp_path / "hurt.sqlite"
    hurt.write_bytes(data[: (root - 1) * page] + rng.bytes(page) + data[root * page :])
    store = open_store(f"sqlite:///{hurt}")
    with (
        pytest.raises(StoreError, match=f"^{re.escape(str(hurt))}: SQLite: .*(malformed|not a database)"),
        store.session() as s,
    ):
        s.exec(select(Context)).all()


@pytest.mark.parametrize(("content", "first_line"), [(b"\x00garbage" * 300, "not a SQLite database")])
def test_cli_says_which_file_is_corrupt(tmp_path: Path, content: bytes, first_line: str) -> None:
    db = tmp_path / "bad.sqlite"
    db.write_bytes(content)
    res = subprocess.run(
        [sys.executable, "-m", "autointerp.cli", "features", "list", "--db", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[0].startswith(f"error: {db}: {first_line}"), res.stderr


def test_sqlite_file_uses_wal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"sqlite:///{tmp_path}/w.sqlite")
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="mysql"):
        open_store("mysql://x")


def test_workers_opening_a_new_database_at_once(tmp_path: Path) -> None:
    """create_all checks, then creates: without the retry, one of two workers opening a new database at the same
    moment failed with "table ... already exists"."""
    import threading

    import autointerp.store.search  # noqa: F401  (registers its tables too, as the query commands do)

    for k in range(8):
        url = f"sqlite:///{tmp_path / f'race{k}.sqlite'}"
        errors: list[BaseException] = []
        start = threading.Barrier(3)

        def work(url: str = url, errors: list[BaseException] = errors, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                open_store(url).engine.dispose()
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
