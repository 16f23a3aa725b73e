"""What the query path adds to the database, and its SQL: the full-text index of ok explanations, their sentence
embeddings, the filters on scores and verdicts, and the searches.

- Full text, SQLite: an FTS5 table over `explanation.text` with external content (the text is not stored twice),
  kept in step by triggers on `explanation`, so every writer, this code or another, updates it in the same
  transaction; ranked by bm25. PostgreSQL: a GIN index on `to_tsvector('english', text)` of ok rows (an
  expression index: the table gets no column), ranked by ts_rank_cd. Both stem English (Porter / Snowball) and the
  query drops the same English stop words, so the same query matches the same explanations on both.
- Embeddings: one float16 vector per ok explanation and encoder (`explanation_embedding`), computed once (their
  SQL: store/embeddings.py).
- `ensure_query_schema` creates what `create_all` cannot (FTS table, triggers, expression and partial indexes,
  the views of store/views.py, the feature list's indexes) and fills the index for rows written before it;
  idempotent, cheap once done. `open_store` runs it when it opens a database for writing, and nothing else does:
  readers (the review page, search) never write (`require_query_schema` checks), and work on a read-only
  database.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, LargeBinary, text
from sqlalchemy.exc import DBAPIError
from sqlmodel import Field, SQLModel

from autointerp import methods
from autointerp.store.dialect import dialect_of
from autointerp.store.engine import Store, StoreError, _shown, is_read_only
from autointerp.store.interventions import VERDICTS
from autointerp.store.tables import utcnow

# PostgreSQL's english.stop (the Snowball list): dropped from every query on both databases, since PostgreSQL's
# parser drops them from documents and queries alike and FTS5 would otherwise match them.
_STOP = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself "
    "it its itself they them their theirs themselves what which who whom this that these those am is are was were be "
    "been being have has had having do does did doing a an the and but if or because as until while of at by for "
    "with about against between into through during before after above below to from up down in out on off over "
    "under again further then once here there when where why how all any both each few more most other some such no "
    "nor not only own same so than too very s t can will just don should now"
)
STOPWORDS = frozenset(_STOP.split())
MARK = ("<<", ">>")  # how snippets mark the matched words, as `features show` marks activating tokens


class QueryError(ValueError):
    """A query the database cannot answer as asked: an empty query, an unknown method or verdict, a score range
    whose minimum is above its maximum, nothing to search."""


class ExplanationEmbedding(SQLModel, table=True):
    """The sentence embedding of one ok explanation by one encoder (float16, little-endian, unit norm)."""

    __tablename__ = "explanation_embedding"
    explanation_id: int = Field(
        sa_column=Column(Integer, ForeignKey("explanation.id", ondelete="CASCADE"), primary_key=True)
    )
    model: str = Field(primary_key=True)
    dim: int
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


@dataclass(frozen=True)
class Filters:
    """Conditions on an explanation (and its feature). `method` names the score that min/max bound: an
    explanation's best score by that method (its best over scorer models and configs)."""

    site: str | None = None
    source: str | None = None
    explainer: str | None = None
    method: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    verdict: str | None = None
    reviewed: bool | None = None

    def checked(self) -> Filters:
        check_method(self.method)
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise QueryError(f"unknown verdict {self.verdict!r}: choose {', '.join(VERDICTS)}")
        lo, hi = self.min_score, self.max_score
        for name, bound in (("minimum", lo), ("maximum", hi)):
            if bound is not None and not math.isfinite(bound):
                raise QueryError(f"the score {name} must be a finite number, not {bound}")
        if lo is not None and hi is not None and lo > hi:
            raise QueryError(f"empty score range: the minimum {lo:g} is above the maximum {hi:g}")
        if (lo is not None or hi is not None) and self.method is None:
            return Filters(**{**self.__dict__, "method": methods.DEFAULT})
        return self

    @property
    def active(self) -> bool:
        """Whether any condition is set (a method alone bounds nothing)."""
        return any(v is not None for k, v in self.__dict__.items() if k != "method")


def check_method(method: str | None) -> None:
    """A method of the registry (autointerp.methods), or None."""
    if method is not None and method not in methods.METHODS:
        raise QueryError(f"unknown score method {method!r}: choose {', '.join(methods.names())}")


def terms(query: str) -> list[str]:
    """The words of a query that can match: lower-cased, split on anything not a letter or digit, stop words and
    repeats dropped (they match nothing on PostgreSQL, so nothing on SQLite either)."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[^\W_]+", query.lower()):
        if w not in STOPWORDS:
            seen.setdefault(w, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------- schema
_FTS = "explanation_fts"
_OK = "status = 'ok' AND text IS NOT NULL"
_SQLITE_DDL = (
    ("table", _FTS, f"CREATE VIRTUAL TABLE {_FTS} USING fts5(text, content='explanation', content_rowid='id', "
                    "tokenize='porter unicode61 remove_diacritics 2')"),
    ("trigger", f"{_FTS}_ai", f"CREATE TRIGGER {_FTS}_ai AFTER INSERT ON explanation "
                              f"WHEN new.status = 'ok' AND new.text IS NOT NULL BEGIN "
                              f"INSERT INTO {_FTS}(rowid, text) VALUES (new.id, new.text); END"),
    ("trigger", f"{_FTS}_ad", f"CREATE TRIGGER {_FTS}_ad AFTER DELETE ON explanation "
                              f"WHEN old.status = 'ok' AND old.text IS NOT NULL BEGIN "
                              f"INSERT INTO {_FTS}({_FTS}, rowid, text) VALUES ('delete', old.id, old.text); END"),
    ("trigger", f"{_FTS}_au", f"CREATE TRIGGER {_FTS}_au AFTER UPDATE OF status, text ON explanation BEGIN "
                              f"INSERT INTO {_FTS}({_FTS}, rowid, text) SELECT 'delete', old.id, old.text "
                              f"WHERE old.status = 'ok' AND old.text IS NOT NULL; "
                              f"INSERT INTO {_FTS}(rowid, text) SELECT new.id, new.text "
                              f"WHERE new.status = 'ok' AND new.text IS NOT NULL; END"),
)  # fmt: skip
_TSV = "to_tsvector('english'::regconfig, coalesce(e.text, ''))"
_PG_DDL = (
    ("index", "ix_explanation_fulltext",
     f"CREATE INDEX ix_explanation_fulltext ON explanation USING GIN ({_TSV.replace('e.text', 'text')}) "
     "WHERE status = 'ok'"),
)  # fmt: skip
# Both databases: ok explanations by id (what counts what is left to embed), and scores by method and explanation
# (the score filters read only this index).
_INDEXES = (
    ("index", "ix_explanation_ok", f"CREATE INDEX ix_explanation_ok ON explanation (id) WHERE {_OK}"),
    ("index", "ix_score_method_explanation",
     "CREATE INDEX ix_score_method_explanation ON score (method, explanation_id, value)"),
    # features list: the best score per feature by a method, read from the index alone
    ("index", "ix_score_method_feature", "CREATE INDEX ix_score_method_feature ON score (method, feature_id, value)"),
    ("index", "ix_score_method_value", "CREATE INDEX ix_score_method_value ON score (method, value, feature_id)"),
    # the review page's feature list, sorted by a statistic: keyset pages along (statistic, id)
    ("index", "ix_feature_max", "CREATE INDEX ix_feature_max ON feature (max_act, id)"),
    ("index", "ix_feature_density", "CREATE INDEX ix_feature_density ON feature (density, id)"),
    ("index", "ix_feature_mean", "CREATE INDEX ix_feature_mean ON feature (mean_act, id)"),
    ("index", "ix_feature_index", 'CREATE INDEX ix_feature_index ON feature ("index", id)'),
    # every search by meaning counts the embeddings (and live claims) of its encoder and reads their largest id:
    # from this index alone, not by reading every row's vector
    ("index", "ix_embedding_state",
     "CREATE INDEX ix_embedding_state ON explanation_embedding (model, dim, created_at, explanation_id)"),
)  # fmt: skip
_READY: weakref.WeakSet[Any] = weakref.WeakSet()  # engines whose query schema ensure_query_schema made
_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()  # engines require_query_schema found it on
_READY_LOCK = threading.Lock()


def _query_ddl(store: Store) -> tuple[tuple[str, str, str], ...]:
    return (_SQLITE_DDL if store.dialect.sqlite else _PG_DDL) + _INDEXES


def _present(store: Store) -> bool:
    """Whether the query schema is in the database, its views of the current definitions."""
    from autointerp.store.views import views_current

    names = {name for _k, name, _sql in _query_ddl(store)} | {ExplanationEmbedding.__tablename__}
    with store.engine.connect() as conn:
        return names <= store.dialect.schema_objects(conn) and views_current(conn)


def ensure_query_schema(store: Store) -> None:
    """Create the full-text index, its triggers, the embedding table, the query indexes and the views where they
    are missing, and index the explanations written before; once per engine and process, a read when all is
    there. Concurrent callers: one at a time (SQLite's write lock, a PostgreSQL advisory lock). Only `open_store`
    calls it, when it opens a database for writing: readers call `require_query_schema`, which never writes."""
    engine = store.engine
    if engine in _READY:
        return
    if not _present(store):
        try:
            _create_query_schema(engine, _query_ddl(store))
        except DBAPIError as exc:  # a PostgreSQL role that may read only
            if is_read_only(exc):
                raise StoreError(
                    f"{_shown(store.url)}: the database is read-only and has no search index yet; open it once "
                    "with write access (any autointerp command) to build it"
                ) from None
            raise
    with _READY_LOCK:
        _READY.add(engine)


def require_query_schema(store: Store) -> None:
    """A StoreError unless what search reads is there: the embedding table and, on SQLite, the full-text table (a
    database opened read-only that no writer opened since they were added lacks them); the indexes and views
    only make it faster or serve people. Reads only, once per engine and process."""
    if store.engine in _READY or store.engine in _CHECKED:
        return
    with store.engine.connect() as conn:
        have = store.dialect.schema_objects(conn)
    if not {ExplanationEmbedding.__tablename__, *([_FTS] if store.dialect.sqlite else [])} <= have:
        raise StoreError(
            f"{_shown(store.url)}: the database has no search index yet and is opened read-only; open it once "
            "with write access (any autointerp command) to build it"
        )
    with _READY_LOCK:
        _CHECKED.add(store.engine)


def _create_query_schema(engine: Any, ddl: tuple[tuple[str, str, str], ...]) -> None:
    from autointerp.store.views import ensure_views

    with engine.begin() as conn:
        dialect = dialect_of(conn)
        dialect.one_at_a_time(conn, "autointerp.query_schema")
        have = dialect.schema_objects(conn)
        ExplanationEmbedding.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
        for _kind, name, sql in ddl:
            if name not in have:
                conn.exec_driver_sql(sql)
        if dialect.sqlite and _FTS not in have:  # rows written before the triggers existed
            conn.exec_driver_sql(f"INSERT INTO {_FTS}(rowid, text) SELECT id, text FROM explanation WHERE {_OK}")
        ensure_views(conn)


def forget_query_schema(store: Store) -> None:
    """Make the next ensure_query_schema look again (after a migration dropped what it made)."""
    with _READY_LOCK:
        _READY.discard(store.engine)
        _CHECKED.discard(store.engine)


# ---------------------------------------------------------------------------------------------- filters
def filter_sql(f: Filters, e: str = "e", feat: str | None = "f", per_row: bool = False) -> tuple[str, dict[str, Any]]:
    """`f` as one SQL condition on the explanation alias `e` (and the feature alias `feat`, when given), with its
    parameters (named q_*). An explanation's verdict is its latest one; reviewed means some reviewer
    decided on it (the review page's `review` table). `per_row`: the verdict looked up for each row (an index
    seek), for a query that reads a page of rows, not every explanation."""
    conds = [f"{e}.status = 'ok'", f"{e}.text IS NOT NULL"]
    p: dict[str, Any] = {}
    if feat is not None and f.site is not None:
        conds.append(f"{feat}.site = :q_site")
        p["q_site"] = f.site
    if feat is not None and f.source is not None:
        conds.append(f"{feat}.source = :q_source")
        p["q_source"] = f.source
    if f.explainer is not None:
        conds.append(f"{e}.explainer = :q_explainer")
        p["q_explainer"] = f.explainer
    best = f"(SELECT max(s.value) FROM score s WHERE s.explanation_id = {e}.id AND s.method = :q_method)"
    if f.min_score is not None:
        conds.append(f"{best} >= :q_min")
        p["q_min"] = f.min_score
    if f.max_score is not None:
        conds.append(f"{best} <= :q_max")
        p["q_max"] = f.max_score
    if f.min_score is not None or f.max_score is not None:
        p["q_method"] = f.method
    if f.verdict is not None and per_row:
        conds.append(f"(SELECT v.verdict FROM verdict v WHERE v.explanation_id = {e}.id "
                     "ORDER BY v.created_at DESC, v.id DESC LIMIT 1) = :q_verdict")  # fmt: skip
        p["q_verdict"] = f.verdict
    elif f.verdict is not None:
        # The explanations whose latest verdict (by time, then id) is this one, as one uncorrelated IN that both
        # databases compute once (a subquery per row cost 0.2 s at 100k explanations; a window function 90 ms).
        conds.append(
            f"{e}.id IN (SELECT v.explanation_id FROM verdict v WHERE v.verdict = :q_verdict AND NOT EXISTS "
            "(SELECT 1 FROM verdict w WHERE w.explanation_id = v.explanation_id AND (w.created_at > v.created_at "
            "OR (w.created_at = v.created_at AND w.id > v.id))))"
        )
        p["q_verdict"] = f.verdict
    if f.reviewed is not None:
        conds.append(f"{'' if f.reviewed else 'NOT '}EXISTS (SELECT 1 FROM review r WHERE r.explanation_id = {e}.id)")
    return " AND ".join(conds), p


def has_explanations(store: Store) -> bool:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql(f"SELECT 1 FROM explanation WHERE {_OK} LIMIT 1").first() is not None


# ---------------------------------------------------------------------------------------------- full text
@dataclass(frozen=True)
class TextHit:
    explanation_id: int
    rank: float  # higher is better (bm25 negated on SQLite, ts_rank_cd on PostgreSQL)
    snippet: str


def fulltext(store: Store, words: Sequence[str], f: Filters, limit: int) -> list[TextHit]:
    """Ok explanations that contain any of `words` (stemmed), best first, with a snippet of each that marks them;
    ties by explanation id. `words` come from `terms`."""
    if not words:
        return []
    start, stop = MARK
    with store.engine.connect() as conn:
        where, p = filter_sql(f)
        p["q_limit"] = limit
        if store.dialect.sqlite:  # full text is a whole feature of each database: FTS5 / tsvector
            p["q_match"] = " OR ".join(f'"{w}"' for w in words)
            ranked: list[tuple[Any, Any]] = conn.execute(  # type: ignore[assignment]
                text(
                    f"SELECT e.id, -bm25({_FTS}) AS r FROM {_FTS} JOIN explanation e ON e.id = {_FTS}.rowid "
                    f"JOIN feature f ON f.id = e.feature_id WHERE {_FTS} MATCH :q_match AND {where} "
                    "ORDER BY r DESC, e.id LIMIT :q_limit"
                ),
                p,
            ).all()
            if not ranked:
                return []
            cond, ids = store.dialect.among_sql(f"{_FTS}.rowid", [r[0] for r in ranked], "q_ids")
            snips = dict(
                conn.execute(
                    text(
                        f"SELECT {_FTS}.rowid, snippet({_FTS}, 0, :a, :b, '…', 32) FROM {_FTS} "
                        f"WHERE {_FTS} MATCH :q_match AND {cond}"
                    ).bindparams(ids),
                    {"q_match": p["q_match"], "a": start, "b": stop},
                ).all()
            )
        else:
            p["q_tsq"] = " | ".join(words)
            opts = f"StartSel={start}, StopSel={stop}, MaxWords=32, MinWords=16, ShortWord=1, FragmentDelimiter=…"
            rows = conn.execute(
                text(
                    f"SELECT e.id, ts_rank_cd({_TSV}, q, 1) AS r, ts_headline('english', e.text, q, :q_opts) "
                    "FROM explanation e JOIN feature f ON f.id = e.feature_id, "
                    "to_tsquery('english'::regconfig, :q_tsq) q "
                    f"WHERE {_TSV} @@ q AND {where} ORDER BY r DESC, e.id LIMIT :q_limit"
                ),
                {**p, "q_opts": opts},
            ).all()
            ranked = [(r[0], r[1]) for r in rows]
            snips = {r[0]: r[2] for r in rows}
    return [TextHit(int(i), float(r), snips.get(i, "")) for i, r in ranked]


def passing(store: Store, ids: Sequence[int] | None, f: Filters) -> set[int]:
    """Those of the explanation `ids` (None: of all) that pass the filters."""
    if ids is not None and not ids:
        return set()
    with store.engine.connect() as conn:
        where, p = filter_sql(f)
        q = "SELECT e.id FROM explanation e JOIN feature f ON f.id = e.feature_id WHERE "
        if ids is None:
            return {int(r[0]) for r in conn.execute(text(q + where), p).all()}
        cond, bound = store.dialect.among_sql("e.id", ids, "q_ids")
        return {int(r[0]) for r in conn.execute(text(f"{q}{cond} AND {where}").bindparams(bound), p).all()}
