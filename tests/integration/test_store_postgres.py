"""The store on a real PostgreSQL server (tests/conftest.py starts one) beside in-memory SQLite, each test on both:
round trips (Hypothesis), idempotent upserts, the bulk write paths (SQLite's fast and portable paths, PostgreSQL's
COPY and portable path), runs and leases, suffix ids, timestamps, integer ranges, a newer schema refused."""

from __future__ import annotations

import math
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, text
from sqlmodel import col, select

from autointerp.store import SCHEMA_VERSION, StoreError, open_store, writes
from autointerp.store.blobs import pack_f16, unpack_i32
from autointerp.store.engine import Store
from autointerp.store.queries import FeatureNotFound, feature_detail, list_features, resolve_feature
from autointerp.store.tables import Context, Corpus, Feature, Record
from autointerp.store.writes import FeatureRow, RecordBatch, write_corpus, write_features

f16_values = st.floats(min_value=-60000, max_value=60000, allow_nan=False, width=16)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty database of each backend: in-memory SQLite, or a new database on the session's PostgreSQL."""
    return "sqlite://" if request.param == "sqlite" else str(request.getfixturevalue("postgres_db"))


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
def test_feature_round_trip(
    db_url: str, index: int, stats: tuple[float, float, float], records: list, rewrite: bool, tiny_store: Any
) -> None:
    store, ids = tiny_store(db_url)
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
    store.engine.dispose()


def test_list_sort_filter_and_resolve(db_url: str, tiny_store: Any) -> None:
    store, _ = tiny_store(db_url)
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


def test_contexts_resume_from_prefix(db_url: str, tiny_store: Any) -> None:
    store, ids = tiny_store(db_url, n_ctx=5)
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


PATHS = [("sqlite", "sqlite"), ("sqlite", None), ("postgresql", "copy"), ("postgresql", None)]


SITE = "blocks.0.mlp.post"


def _plain(index: int, run_id: int | None = None) -> FeatureRow:
    """A feature with no records, of the seeded model and corpus."""
    return FeatureRow("m", SITE, "neurons", index, "ok", 1.0, 0.0, 0.5, 10, {}, "c", run_id)  # type: ignore[arg-type]


def _url(backend: str, tmp_path: Path, name: str, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/{name}.sqlite"
    return str(request.getfixturevalue("postgres_server")).rsplit("/", 1)[0] + "/" + _new_pg_database(request)


def _new_pg_database(request: pytest.FixtureRequest) -> str:
    """One more fresh database on the session's server (postgres_db gives one per test), dropped at the end."""
    import uuid

    import psycopg

    admin = str(request.getfixturevalue("postgres_server")).replace("postgresql+psycopg://", "postgresql://")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    request.addfinalizer(drop)
    return name


def _rows(store: Store) -> dict[str, Any]:
    """What a collection's write stores, by natural keys (row ids left out), read through SQLAlchemy: values as
    Python sees them on either database (JSON decoded, datetimes aware)."""
    with store.session() as s:
        ctx = {c.id: (c.corpus_id, c.idx) for c in s.exec(select(Context)).all()}
        feats = s.exec(select(Feature)).all()
        key = {f.id: f.key for f in feats}
        return {
            "contexts": sorted((c.corpus_id, c.idx, c.doc_idx, c.offset, c.tokens) for c in s.exec(select(Context))),
            "features": {
                f.key: (
                    f.model_id,
                    f.site,
                    f.source,
                    f.index,
                    f.status,
                    f.max_act,
                    f.mean_act,
                    f.density,
                    f.n_tokens,
                    f.histogram,
                    f.corpus_id,
                    f.created_at,
                )
                for f in feats
            },  # fmt: skip
            "records": {
                (key[r.feature_id], ctx[r.context_id]): (r.role, r.split, r.rank, r.bin, r.max_act, bytes(r.acts))
                for r in s.exec(select(Record)).all()
            },
        }


@pytest.mark.parametrize("rewrite", [False, True])
def test_every_write_path_writes_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, rewrite: bool, tiny_store: Any
) -> None:
    """SQLite's bulk path (raw multi-row inserts, reused JSON), PostgreSQL's (binary COPY) and the portable path on
    each store the same rows; on SQLite the same bytes, on PostgreSQL the same JSON text."""
    monkeypatch.setattr(writes, "utcnow", lambda: datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc))
    edges = [2.0 ** (i / 2) for i in range(-24, 25)]  # shared by every feature, as the collector's are
    n_feat, n_rec = 6, 300  # more than one statement's worth of records (_SQLITE_MAX_VARS)

    def feature(i: int, records: list) -> FeatureRow:  # type: ignore[type-arg]
        hist = {"edges": edges, "counts": list(range(i, 48 + i)), "every": 4, "note": "café \x00"}
        n_tok = 10 if i else 2**31 + 5  # past a 32-bit integer (PostgreSQL's integer until schema 6)
        return FeatureRow("m", SITE, "neurons", i, "ok", 1.5 * i, 0.1, 0.2, n_tok, hist, "c", None, records)  # type: ignore[arg-type]

    dumps, raw = [], []
    own = writes._fast_path
    for backend, path in PATHS:
        rng = np.random.default_rng(0)
        url = _url(backend, tmp_path, str(path), request)
        monkeypatch.setattr(writes, "_fast_path", lambda conn, path=path: path)
        store, ids = tiny_store(url, n_ctx=60, ctx_len=5)
        with store.engine.connect() as conn:
            assert path is None or own(conn) == path  # the database's own choice
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
        dumps.append(_rows(store))
        with store.engine.connect() as conn:  # the bytes as stored: the JSON's text, SQLite's timestamp text
            if backend == "sqlite":
                raw.append(
                    [conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY 1, 2").all() for t in ("feature", "record")]
                )  # noqa: E501
            else:
                raw.append(conn.exec_driver_sql("SELECT key, histogram::text FROM feature ORDER BY key").all())
        store.engine.dispose()
    assert dumps[0] == dumps[1] == dumps[2] == dumps[3]
    assert raw[0] == raw[1] and raw[2] == raw[3]
    features, records = raw[0]
    assert len(features) == n_feat and len(records) == n_feat + n_rec
    assert {r[-1] for r in features} == {"2026-01-02 03:04:05.678901"}
    assert dumps[0]["features"]["m/blocks.0.mlp.post/neurons/0"][8] == 2**31 + 5


def test_run_rows_name_their_worker_and_beat_on_every_write(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from autointerp.store import runs
    from autointerp.store.tables import Run

    store = open_store(db_url)
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


def test_a_collection_is_the_same_on_every_write_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, collect_into: Any
) -> None:
    """The tiny GPT-2 collection through SQLite's fast path, SQLite's portable path, PostgreSQL's COPY and
    PostgreSQL's portable path: the same contexts, features and records (timestamps aside)."""
    dumps = []
    for backend, path in PATHS:
        monkeypatch.setattr(writes, "_fast_path", lambda conn, path=path: path)
        url = _url(backend, tmp_path, str(path), request)
        (tmp_path / str(path) / backend).mkdir(parents=True)
        collect_into(url, tmp_path / str(path) / backend)
        store = open_store(url)
        rows = _rows(store)
        rows["features"] = {k: v[:-1] for k, v in rows["features"].items()}  # created_at: when it ran
        dumps.append(rows)
        store.engine.dispose()
    assert len(dumps[0]["records"]) > 1000 and len(dumps[0]["features"]) == 128
    for other in dumps[1:]:
        assert other == dumps[0]


def test_in_with_more_ids_than_a_statement_takes(db_url: str, tiny_store: Any) -> None:
    """PostgreSQL takes at most 65,535 parameters per statement; IN binds one per value."""
    from autointerp.store import queries
    from autointerp.store.explanations import explanations_for, ok_explanations
    from autointerp.store.interventions import correlational_scores, interventions_of
    from autointerp.store.tables import Explanation
    from autointerp.store.upsert import finished

    store, _ = tiny_store(db_url)
    write_features(store, [_plain(i) for i in range(3)])
    many = list(range(1, 70_001))
    assert [f.index for f in queries.features_by_ids(store, many)] == [0, 1, 2]
    assert len(explanations_for(store, many)) == len(many) and ok_explanations(store, many) == []
    assert interventions_of(store, many, "h") == {} and len(correlational_scores(store, many)) == len(many)
    assert finished(store, Explanation, "feature_id", {}, ("ok",), within=many) == set()


def test_suffix_ids_resolve_alike_on_both_databases(db_url: str, tiny_store: Any) -> None:
    """SQLite's LIKE ignores ASCII case; PostgreSQL's does not, so the same id resolved on one only."""
    from autointerp.store.queries import resolve_feature

    store, _ = tiny_store(db_url)
    write_features(store, [_plain(7)])
    assert resolve_feature(store, "NEURONS/7").key == resolve_feature(store, "neurons/7").key


def test_text_and_json_postgresql_refuses_are_stored(db_url: str, tiny_store: Any) -> None:
    """A NUL character in text and NaN or an infinity in JSON: SQLite stores them, PostgreSQL's text and json types
    refuse them. There the NUL becomes U+FFFD and the number null, instead of a failed write."""
    from autointerp.store.explanations import explanations_for, write_explanations
    from autointerp.store.scores import scores_for, write_scores
    from autointerp.store.tables import Explanation, Score

    store, _ = tiny_store(db_url)
    write_features(store, [_plain(1)])
    fid = resolve_feature(store, "neurons/1").id
    assert fid is not None
    raw = "Explanation: a\x00b"
    row = Explanation(feature_id=fid, explainer="llm", model="x", prompt="p", prompt_hash="h", config_hash="c",
                      status="failed", raw=raw, error=f"bad: {raw}")  # fmt: skip
    write_explanations(store, [row])
    (e,) = explanations_for(store, [fid])[fid]
    postgres = db_url.startswith("postgres")
    assert e.raw == (raw.replace("\x00", "\ufffd") if postgres else raw) and e.error == f"bad: {e.raw}"
    details = {"p_value": float("nan"), "logprobs": [-float("inf"), -1.5], "text": "a\x00b"}
    write_scores(store, [Score(explanation_id=e.id, feature_id=fid, method="detection", model="x", status="ok",
                               value=0.5, details=details)])  # fmt: skip
    (got,) = scores_for(store, fid)
    if postgres:
        assert got.details == {"p_value": None, "logprobs": [None, -1.5], "text": "a\x00b"}
    else:
        assert math.isnan(got.details["p_value"]) and got.details["logprobs"][0] == -math.inf


def test_timestamps_come_back_in_utc_whatever_the_server_zone(db_url: str, tiny_store: Any) -> None:
    from autointerp.store import runs
    from autointerp.store.explanations import explanations_for, write_explanations
    from autointerp.store.tables import Explanation

    if db_url.startswith("postgres"):
        with open_store(db_url).engine.begin() as conn:
            name = conn.exec_driver_sql("SELECT current_database()").scalar()
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
    store, _ = tiny_store(db_url)
    if db_url.startswith("postgres"):
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "America/New_York"
    before = datetime.now(timezone.utc)
    run_id = runs.start_run(store, "explain", {}, total=1)
    write_features(store, [_plain(1, run_id)])
    fid = resolve_feature(store, "neurons/1").id
    assert fid is not None
    write_explanations(store, [Explanation(feature_id=fid, explainer="tokens", model="", prompt="", prompt_hash="h",
                                           config_hash="c", status="ok", text="t")])  # fmt: skip
    (run,) = runs.runs_of(store)
    assert run.heartbeat_at is not None and run.heartbeat_at.utcoffset() is not None
    assert before <= run.heartbeat_at <= datetime.now(timezone.utc) and run.heartbeat_at.tzinfo == timezone.utc
    (e,) = explanations_for(store, [fid])[fid]
    assert e.created_at.endswith("+00:00")  # what `features show --json` prints
    f = resolve_feature(store, "neurons/1")
    assert f.created_at.tzinfo == timezone.utc and before <= f.created_at


def test_a_concurrent_insert_of_the_same_key_is_retried_as_an_update(
    tmp_path: Path, db_url: str, tiny_store: Any
) -> None:
    """upsert reads, then inserts: another writer's row with the same key, committed in between, makes the
    commit fail on the unique key and the retry update that row."""
    from sqlalchemy import event
    from sqlmodel import Session

    from autointerp.store.explanations import write_explanations
    from autointerp.store.tables import Explanation

    url = f"sqlite:///{tmp_path}/race.sqlite" if db_url == "sqlite://" else db_url  # two connections: a file
    store, _ = tiny_store(url)
    write_features(store, [_plain(1)])
    fid = resolve_feature(store, "neurons/1").id
    assert fid is not None

    def row(status: str) -> Explanation:
        return Explanation(feature_id=fid, explainer="llm", model="x", prompt="p", prompt_hash="h", config_hash="c",
                           status=status, text="ours" if status == "ok" else None)  # fmt: skip

    other = open_store(url)
    fired: list[int] = []

    def meanwhile(session: Session) -> None:
        if not fired:
            fired.append(1)
            with other.session() as s:  # the other worker's row, committed first
                s.add(row("failed"))
                s.commit()

    event.listen(Session, "before_commit", meanwhile)
    try:
        write_explanations(store, [row("ok")])
    finally:
        event.remove(Session, "before_commit", meanwhile)
    with store.session() as s:
        (stored,) = s.exec(select(Explanation)).all()
    assert fired and (stored.status, stored.text, stored.attempts) == ("ok", "ours", 2)
    other.engine.dispose()
    store.engine.dispose()


@pytest.mark.parametrize("path", ["fast", None])
def test_an_integer_out_of_range_is_refused_on_every_path(
    db_url: str, monkeypatch: pytest.MonkeyPatch, path: str | None, tiny_store: Any
) -> None:
    """psycopg's binary COPY would wrap an integer past the column's range silently; the portable path's server
    refuses it: so must COPY (and SQLite's 64-bit integers refuse what Python cannot bind)."""
    if path is None:
        monkeypatch.setattr(writes, "_fast_path", lambda conn: None)
    store, _ = tiny_store(db_url)
    too_big = 2**63 + 1 if db_url.startswith("sqlite") else 2**31 + 1  # feature.index: a 32-bit integer there
    with pytest.raises(Exception, match="(?i)range|too large|does not fit"):
        write_features(store, [_plain(too_big)])
    with store.session() as s:
        assert s.exec(select(Feature)).all() == []


def test_newer_postgresql_schema_is_refused_untouched(postgres_db: str) -> None:
    store = open_store(postgres_db)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
        conn.execute(text("DROP TABLE llm_cache"))  # a newer schema may have dropped a table: it must not come back
    store.engine.dispose()
    with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 1} is newer than this autointerp's"):
        open_store(postgres_db)
    from sqlalchemy import create_engine, inspect

    engine = create_engine(postgres_db)
    assert not inspect(engine).has_table("llm_cache")
    engine.dispose()


def test_leases_expire_are_renewed_and_pass_to_another_worker(db_url: str) -> None:
    """The claim rules on both databases: a held unit is nobody else's while its lease runs (renewed by the
    heartbeat); a silent worker's expired units go to the next claimer, and its late finish is refused; a
    restarted worker's old units are released at once, and its heartbeat no longer holds them."""
    import time

    from autointerp.store.tables import Unit
    from autointerp.store.units import claim, count_open, expire_worker, finish_units, heartbeat, register_units

    store = open_store(db_url)
    register_units(store, "explain", "x", [11, 12, 13], [])
    assert [u.feature_id for u in claim(store, "explain", "x", "a", 2, 1.0)] == [11, 12]
    assert [u.feature_id for u in claim(store, "explain", "x", "b", 5, 60)] == [13]  # a's two are held
    time.sleep(0.6)
    heartbeat(store, "a", 1.0)  # renewed: 1 s from now
    time.sleep(0.6)
    assert claim(store, "explain", "x", "b", 5, 60) == []  # past the first lease, inside the renewed one
    time.sleep(0.8)  # a went silent: its leases ran out
    assert sorted(u.feature_id for u in claim(store, "explain", "x", "b", 5, 60)) == [11, 12]
    with store.session() as s:
        ids = [u.id for u in s.exec(select(Unit).where(Unit.stage == "explain")).all()]
    assert finish_units(store, dict.fromkeys(ids, "ok"), "a") == 0  # a's late finish: b holds them now
    assert finish_units(store, dict.fromkeys(ids, "ok"), "b") == 3 and count_open(store, [("explain", "x")]) == 0
    register_units(store, "score", "y", [11, 12], [])
    assert len(claim(store, "score", "y", "c", 2, 60)) == 2
    assert expire_worker(store, "c") == 2  # c restarted after a kill -9
    heartbeat(store, "c", 60)  # the new c's heartbeat does not take them back
    assert sorted(u.feature_id for u in claim(store, "score", "y", "d", 5, 60)) == [11, 12]
