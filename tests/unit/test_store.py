"""Store round trips on in-memory SQLite (Hypothesis), idempotent upserts, schema version."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete
from sqlmodel import col, select

from autointerp.store import SCHEMA_VERSION, StoreError, open_store, writes
from autointerp.store.blobs import pack_f16, pack_i32, unpack_f16, unpack_i32
from autointerp.store.queries import FeatureNotFound, feature_detail, list_features, resolve_feature
from autointerp.store.tables import Context, Corpus, Feature, Record, SchemaVersion, SubjectModel
from autointerp.store.writes import FeatureRow, RecordBatch, upsert_model, write_corpus, write_features

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


def _seed_store(url: str = "sqlite://", n_ctx: int = 5, ctx_len: int = 4):  # type: ignore[no-untyped-def]
    store = open_store(url)
    upsert_model(
        store,
        SubjectModel(id="m", family="llama", source="x", n_layers=2, d_model=8),
        {"blocks.0.mlp.post": 16},
    )
    toks = np.arange(n_ctx * ctx_len).reshape(n_ctx, ctx_len)
    corpus = Corpus(
        id="c",
        name="c",
        source="c",
        tokenizer="m",
        ctx_len=ctx_len,
        bos_token_id=1,
        n_docs=1,
        n_contexts=n_ctx,
        seed=0,
    )
    ids = write_corpus(store, corpus, ["doc"], toks, np.zeros(n_ctx, int), np.arange(n_ctx) * 3)
    return store, ids


record_st = st.builds(
    lambda ctx, role, split, acts: (ctx, role, split, acts),
    st.integers(min_value=0, max_value=4),
    st.sampled_from(["top", "quantile", "random"]),
    st.sampled_from(["train", "test"]),
    st.lists(f16_values, min_size=3, max_size=3),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    index=st.integers(min_value=0, max_value=10**6),
    stats=st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.floats(0, 1)),
    records=st.lists(record_st, max_size=6, unique_by=lambda r: r[0]),
    rewrite=st.booleans(),
)
def test_feature_round_trip(index: int, stats: tuple[float, float, float], records: list, rewrite: bool) -> None:
    store, ids = _seed_store()
    row = FeatureRow(
        model_id="m",
        site="blocks.0.mlp.post",
        source="neurons",
        index=index,
        status="ok",
        max_act=stats[0],
        mean_act=stats[1],
        density=stats[2],
        n_tokens=100,
        histogram={"edges": [0.0, 1.0], "counts": [3]},
        corpus_id="c",
        run_id=None,  # type: ignore[arg-type]
        records=[
            (ids[c], role, split, i, None, max(a), pack_f16(np.asarray(a, np.float32)))
            for i, (c, role, split, a) in enumerate(records)
        ],
    )
    write_features(store, [row])
    if rewrite:  # an idempotent rewrite keeps the feature's row id and replaces its records
        write_features(store, [row])
    detail = feature_detail(store, f"m/blocks.0.mlp.post/neurons/{index}")
    assert detail.summary.index == index
    assert detail.summary.max == stats[0] and detail.summary.density == stats[2]
    assert detail.histogram == {"edges": [0.0, 1.0], "counts": [3]}
    got = sorted((r.context_idx, r.role, r.split, tuple(r.acts)) for r in detail.records)
    want = sorted((c, role, split, tuple(np.float16(a).astype(float))) for c, role, split, a in records)
    assert got == want
    with store.session() as s:
        assert len(s.exec(select(Feature)).all()) == 1
        assert len(s.exec(select(Record)).all()) == len(records)


def test_list_sort_filter_and_resolve() -> None:
    store, _ = _seed_store()
    rows = [
        FeatureRow(
            "m",
            "blocks.0.mlp.post",
            "neurons",
            i,
            "ok" if i else "dead",
            float(i),
            0.0,
            1 / (i + 1),
            10,
            {},
            "c",
            None,
            [],
        )  # type: ignore[arg-type]
        for i in range(4)
    ]
    write_features(store, rows)
    assert [f.index for f in list_features(store, sort="max")] == [3, 2, 1, 0]
    assert [f.index for f in list_features(store, sort="density")] == [0, 1, 2, 3]
    assert [f.index for f in list_features(store, status="dead")] == [0]
    assert resolve_feature(store, "neurons/2").index == 2
    assert resolve_feature(store, "m/blocks.0.mlp.post/neurons/3").index == 3
    with pytest.raises(FeatureNotFound, match="neurons/9"):
        resolve_feature(store, "neurons/9")


def test_contexts_resume_from_prefix() -> None:
    store, ids = _seed_store(n_ctx=5)
    with store.session() as s:  # an interrupted insert leaves a prefix of the contexts
        s.execute(delete(Context).where(col(Context.idx) >= 3))
        s.commit()
    toks = np.arange(20).reshape(5, 4)
    corpus = Corpus(
        id="c", name="c", source="c", tokenizer="m", ctx_len=4, bos_token_id=1, n_docs=1, n_contexts=5, seed=0
    )
    again = write_corpus(store, corpus, ["doc"], toks, np.zeros(5, int), np.zeros(5, int))
    assert sorted(again) == [0, 1, 2, 3, 4]
    assert {i: again[i] for i in range(3)} == {i: ids[i] for i in range(3)}  # the prefix keeps its row ids
    with store.session() as s:
        rows = {c.idx: unpack_i32(c.tokens).tolist() for c in s.exec(select(Context)).all()}
    assert rows == {i: toks[i].tolist() for i in range(5)}


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


def test_corrupt_sqlite_files_are_store_errors_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(rng.bytes(5000))
    with pytest.raises(StoreError, match=f"^{re.escape(str(junk))}: not a SQLite database"):
        open_store(f"sqlite:///{junk}")
    assert not (tmp_path / "junk.sqlite-wal").exists()

    real = tmp_path / "real.sqlite"
    _seed_store(f"sqlite:///{real}", n_ctx=400, ctx_len=64)[0].engine.dispose()
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


@pytest.mark.parametrize("rewrite", [False, True])
def test_sqlite_fast_path_writes_what_the_portable_path_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rewrite: bool
) -> None:
    """The SQLite-only bulk path (raw multi-row inserts, reused JSON) stores the same bytes as the portable one."""
    monkeypatch.setattr(writes, "utcnow", lambda: datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc))
    edges = [2.0 ** (i / 2) for i in range(-24, 25)]  # shared by every feature, as the collector's are
    n_feat, n_rec = 6, 300  # more than one statement's worth of records (_SQLITE_MAX_VARS)

    def feature(i: int, records: list) -> FeatureRow:  # type: ignore[type-arg]
        hist = {"edges": edges, "counts": list(range(i, 48 + i)), "every": 4}
        return FeatureRow("m", "blocks.0.mlp.post", "neurons", i, "ok", 1.5 * i, 0.1, 0.2, 10, hist, "c", None, records)  # type: ignore[arg-type]

    dumps = []
    for fast in (True, False):
        rng = np.random.default_rng(0)
        monkeypatch.setattr(writes, "_sqlite_fast_path", lambda conn, fast=fast: fast)
        url = f"sqlite:///{tmp_path}/{fast}.sqlite"
        store, ids = _seed_store(url, n_ctx=60, ctx_len=5)
        feats = [feature(i, [(ids[i], "top", "train", 0, None, 2.5, pack_f16(np.ones(4)))]) for i in range(n_feat)]
        batch = RecordBatch(
            feature=np.repeat(np.arange(n_feat), n_rec // n_feat),
            context_id=np.asarray([ids[c] for c in np.tile(np.arange(10, 60), n_feat)]),
            role=np.array(["quantile", "random"] * (n_rec // 2), dtype=object),
            split=np.array(["train", "test", "test"] * (n_rec // 3), dtype=object),
            rank=np.arange(n_rec),
            bin=np.where(np.arange(n_rec) % 2 == 0, np.arange(n_rec) % 5, -1),
            max_act=rng.standard_normal(n_rec).astype(np.float32).astype(np.float64),
            acts=rng.standard_normal((n_rec, 4)).astype(np.float16),
        )
        write_features(store, feats, batch)
        if rewrite:
            write_features(store, feats[::-1], RecordBatch(**{**batch.__dict__, "feature": n_feat - 1 - batch.feature}))
        con = sqlite3.connect(f"{tmp_path}/{fast}.sqlite")
        dumps.append([con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("feature", "record")])
    assert dumps[0] == dumps[1]
    features, records = dumps[0]
    assert len(features) == n_feat and len(records) == n_feat + n_rec
    assert {r[-1] for r in features} == {"2026-01-02 03:04:05.678901"}


def test_run_rows_name_their_worker_and_beat_on_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from autointerp.store import runs
    from autointerp.store.tables import Run

    store = open_store("sqlite://")
    clock = iter(datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc) for s in range(60))
    monkeypatch.setattr(runs, "utcnow", lambda: next(clock))
    run_id = runs.start_run(store, "explain", {}, total=3)

    def row() -> Run:
        with store.session() as s:
            found = s.get(Run, run_id)
            assert found is not None
            return found

    first = row()
    assert first.worker == runs.worker_name() == f"{socket.gethostname()}:{os.getpid()}"
    assert first.heartbeat_at is not None and first.status == "running"
    runs.update_run(store, run_id, 1, {"ok": 1})
    second = row().heartbeat_at
    assert second is not None and second > first.heartbeat_at
    runs.finish_run(store, run_id, "interrupted", {"ok": 1}, error="KeyboardInterrupt: stop")
    third = row()
    assert third.heartbeat_at is not None and third.heartbeat_at > second and third.finished_at == third.heartbeat_at
    monkeypatch.setattr(runs, "worker_name", lambda: "other-host:42")  # another process takes the run over
    taken = runs.get_or_create_run(store, "explain", third.key, {}, total=3)
    assert (taken.status, taken.worker, taken.error, taken.finished_at) == ("running", "other-host:42", None, None)
    assert taken.heartbeat_at is not None and taken.heartbeat_at > third.heartbeat_at
    runs.finish_run(store, run_id, "done", {"ok": 3})
    assert runs.get_or_create_run(store, "explain", third.key, {}, total=3).worker == "other-host:42"  # done: kept
