"""Store round trips on in-memory SQLite (Hypothesis), idempotent upserts, schema version."""

from __future__ import annotations

import sqlite3
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


def test_schema_version_recorded_and_newer_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path}/v.sqlite"
    store = open_store(url)
    with store.session() as s:
        row = s.exec(select(SchemaVersion)).one()
        assert row.version == SCHEMA_VERSION
        row.version = SCHEMA_VERSION + 1
        s.add(row)
        s.commit()
    with pytest.raises(StoreError, match="newer"):
        open_store(url)


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
