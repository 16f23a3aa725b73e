"""The store's one Dialect object (each SQLite / PostgreSQL difference spelled once), the writes of the intervene
stage through the shared upsert, the feature list's one query, and readers that never write: a read-only database
lacking the list's indexes or current views still lists and searches. The intervene writes on both databases:
tests/integration/test_store_dialect_postgres.py."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Integer, column, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from autointerp.store import SCHEMA_VERSION, open_store
from autointerp.store.browse import ListQuery, list_page
from autointerp.store.dialect import Dialect, dialect_of
from autointerp.store.engine import Store, _open_read_only, sqlite_file
from autointerp.store.queries import list_features
from autointerp.store.tables import Verdict

LITE, PG = Dialect("sqlite", "pysqlite"), Dialect("postgresql", "psycopg")


def _sql(expr: Any, d: Dialect) -> str:
    return str(expr.compile(dialect=sqlite.dialect() if d.sqlite else postgresql.dialect()))


class _Conn:
    """A connection that records what it is asked to run."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def exec_driver_sql(self, sql: str) -> None:
        self.ran.append(sql)


def test_each_difference_is_spelled_by_the_dialect() -> None:
    x = column("x", Integer)
    assert " IN " in _sql(LITE.among(x, [1, 2]), LITE) and "= ANY (" in _sql(PG.among(x, [1, 2]), PG)
    assert LITE.among_sql("e.id", [1], "q")[0] == "e.id IN :q" and PG.among_sql("e.id", [1], "q")[0] == "e.id = ANY(:q)"
    assert "ILIKE" not in _sql(LITE.endswith_ci(x, "/a_b"), LITE) and "ILIKE" in _sql(PG.endswith_ci(x, "/a_b"), PG)
    assert LITE.storable("a\x00b") == "a\x00b" and PG.storable("a\x00b") == "a\ufffdb" and PG.storable(3) == 3
    assert (LITE.skip_locked("u"), PG.skip_locked("u")) == ("", " FOR UPDATE OF u SKIP LOCKED")
    ran = {}
    for d in (LITE, PG):
        conn = _Conn()
        d.begin_write(conn)
        d.one_at_a_time(conn, "autointerp.x")
        ran[d.name] = conn.ran
    assert ran["sqlite"] == ["BEGIN IMMEDIATE", "BEGIN IMMEDIATE"]
    assert ran["postgresql"] == ["SELECT pg_advisory_xact_lock(hashtext('autointerp.x'))"]
    with pytest.raises(ValueError, match="lock name"):
        PG.one_at_a_time(_Conn(), "x'); DROP TABLE feature; --")


def test_dialect_of_a_store_its_engine_a_connection_and_a_session_is_one_object() -> None:
    store = open_store("sqlite://")
    with store.engine.connect() as conn, Session(store.engine) as s:
        found = {id(dialect_of(w)) for w in (store, store.engine, conn, s, store.dialect)}
    assert found == {id(store.dialect)} and store.dialect.sqlite and not store.dialect.row_locks
    with pytest.raises(TypeError, match="no database dialect"):
        dialect_of(object())


# ------------------------------------------------------------------------------------------------- readers

_WRITES = re.compile(r"^\s*(CREATE|DROP|ALTER|INSERT|UPDATE|DELETE|REPLACE|BEGIN IMMEDIATE)\b", re.IGNORECASE)


def _reads(store: Store) -> list[Any]:
    """What readers return: the list (every sort, by offset and by keyset page), search, menus, ids."""
    from autointerp.query.search import search
    from autointerp.store.explanations import feature_key_of
    from autointerp.store.queries import distinct_values

    out: list[Any] = []
    for sort in ("max", "density", "mean", "index", "score"):
        out.append([(r.id, r.score, r.explanation) for r in list_features(store, sort=sort, limit=None)])
        out.append([(r.id, r.score) for r in list_features(store, sort=sort, verdict="verified", min_score=0.1)])
        out.append([r.feature.id for r in list_page(store, ListQuery(sort=sort), limit=5).rows])
    out.append([h.explanation for h in search(store, "tax policy").hits])
    out.append({c: distinct_values(store, c) for c in ("site", "source", "status", "explainer")})
    out.append(feature_key_of(store, 1))
    return out


def test_readers_run_no_write_statement(collected_db: str, seed: Any) -> None:
    store = open_store(collected_db)
    seed(store)
    ran: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, sql, *_a: ran.append(sql))
    _reads(store)
    assert ran and [s for s in ran if _WRITES.match(s)] == []


def test_a_read_only_database_without_the_list_indexes_or_current_views_lists_and_searches(
    collected_db: str, tmp_path: Path, seed: Any
) -> None:
    """Written by an older autointerp, never opened since by this one to write: no list indexes, a view of an
    older definition. Readers find what they read there (the indexes make the list fast, they change no row)."""
    store = open_store(collected_db)
    seed(store)
    want = _reads(store)
    with store.engine.begin() as conn:
        for name in ("ix_feature_max", "ix_feature_density", "ix_score_method_value", "ix_score_method_feature"):
            conn.exec_driver_sql(f"DROP INDEX {name}")
        conn.exec_driver_sql("DROP VIEW feature_summary")
    store.engine.dispose()
    path = sqlite_file(collected_db)
    assert path is not None
    copy = tmp_path / "old.sqlite"
    shutil.copy(path, copy)
    before = copy.read_bytes()
    old = _open_read_only(f"sqlite:///{copy}", copy, SCHEMA_VERSION)  # mode=ro: SQLite refuses every write
    assert old.read_only and _reads(old) == want
    old.engine.dispose()
    assert copy.read_bytes() == before
    with sqlite3.connect(copy) as con:  # nothing made them meanwhile
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'ix_feature_max'").fetchone() == (0,)


# ------------------------------------------------------------------------------------------------- the one list


def _reference(store: Store, q: ListQuery) -> list[tuple[str, float | None, str | None]]:
    """The list as its definition says, computed in Python from every row: (feature id, best score, its text)."""
    from sqlmodel import select

    from autointerp.store.tables import Explanation, Feature, Score

    with store.session() as s:
        feats = list(s.exec(select(Feature)).all())
        expl = {e.id: e for e in s.exec(select(Explanation)).all()}
        scores = sorted(s.exec(select(Score)).all(), key=lambda r: r.id or 0)
        verdicts = sorted(s.exec(select(Verdict)).all(), key=lambda v: (v.created_at, v.id or 0))
    latest = {v.explanation_id: v.verdict for v in verdicts}  # the last one of each explanation wins

    def passes(e: Any) -> bool:
        return (e.status == "ok" and e.text is not None and q.explainer in (None, e.explainer)
                and q.verdict in (None, latest.get(e.id)))  # fmt: skip

    filtered = q.explainer is not None or q.verdict is not None
    best: dict[int, tuple[float, str | None]] = {}
    for r in scores:  # by id: of equal values, the first row's text
        e = expl[r.explanation_id]
        counts = r.method == q.method and r.value is not None and (not filtered or passes(e))
        if counts and (r.feature_id not in best or r.value > best[r.feature_id][0]):
            best[r.feature_id] = (r.value, e.text)
    keep = [f for f in feats if not filtered or any(e.feature_id == f.id and passes(e) for e in expl.values())]
    if q.min_score is not None or q.max_score is not None:
        lo, hi = q.min_score, q.max_score
        keep = [f for f in keep if f.id in best and (lo is None or best[f.id][0] >= lo)
                and (hi is None or best[f.id][0] <= hi)]  # fmt: skip
    stat = {"max": lambda f: -f.max_act, "density": lambda f: -f.density, "mean": lambda f: -f.mean_act,
            "index": lambda f: f.index, "score": lambda f: (f.id not in best, -best.get(f.id, (0.0,))[0])}  # fmt: skip
    keep.sort(key=lambda f: (stat[q.sort](f), f.id))
    return [(f.key, *best.get(f.id, (None, None))) for f in keep]  # type: ignore[misc]


def test_the_list_is_what_its_definition_says_by_page_and_by_offset(
    collected_db: str, seed: Any, seed_explanations: Any
) -> None:
    """Every sort and filter, walked by keyset pages of 3 and read by list_features (offsets too), against the
    list computed from every row; ties of score between features (by id) and within one (the first row's text)."""
    from autointerp.store.scores import write_scores
    from autointerp.store.tables import Explanation, Score

    store = open_store(collected_db)
    ids = seed(store)
    with store.session() as s:
        fid = {e.text: e.feature_id for e in s.exec(Explanation.__table__.select()).all()}  # type: ignore[attr-defined]
    ties = [('the tokens "war" and "army"', 0.7), ("war and military conflict", 0.7), ("numbers and dates", 0.55)]
    write_scores(store, [Score(explanation_id=ids[t], feature_id=fid[t], method="simulation", model="s3", status="ok",
                               value=v) for t, v in ties])  # fmt: skip
    assert len(seed_explanations) == 12  # the seeded explanations, by feature position
    queries = [ListQuery(sort=sort, **kw) for sort in ("max", "density", "mean", "index", "score") for kw in (
        {}, {"verdict": "verified"}, {"explainer": "tokens"}, {"min_score": 0.5}, {"max_score": 0.6},
        {"min_score": 0.3, "max_score": 0.7, "explainer": "llm"}, {"verdict": "unverified", "method": "detection"},
    )]  # fmt: skip
    for q in queries:
        want = _reference(store, q)
        assert want, q
        got, cursor = [], None
        while True:
            page = list_page(store, q, cursor, limit=3)
            got += [(r.feature.id, r.feature.score, r.feature.explanation) for r in page.rows]
            if (cursor := page.next_cursor) is None:
                break
        assert got == want, q
        kw = dict(sort=q.sort, score_method=q.method, min_score=q.min_score, max_score=q.max_score,
                  explainer=q.explainer, verdict=q.verdict)  # fmt: skip
        listed = [(r.id, r.score, r.explanation) for r in list_features(store, limit=None, **kw)]
        assert listed == want and [(r.id, r.score) for r in list_features(store, limit=2, offset=3, **kw)] == [
            (i, v) for i, v, _t in want[3:5]]  # fmt: skip
