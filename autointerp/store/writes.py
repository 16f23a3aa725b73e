"""Idempotent writes used by the stages. Bulk paths use SQLAlchemy Core (ORM objects cost ~10x per row).

A collection's contexts, features and records go in through each database's fast path: multi-row inserts on
SQLite's raw cursor (features and records), binary COPY on PostgreSQL (contexts, features and records). Each has a
portable twin (SQLAlchemy inserts, DBAPI executemany) that `_fast_path` selects for any other database, and that
tests force to show that both write the same rows.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Literal, cast

import numpy as np
from sqlalchemy import delete, insert, update
from sqlmodel import col, func, select

from autointerp.store.blobs import pack_i32
from autointerp.store.dialect import among, dialect_of
from autointerp.store.engine import Store, json_for_postgresql
from autointerp.store.tables import (
    Context,
    Corpus,
    Document,
    Feature,
    Record,
    SAERow,
    Site,
    SubjectModel,
    utcnow,
)
from autointerp.store.upsert import insert_missing


def upsert_model(store: Store, row: SubjectModel, sites: dict[str, int]) -> None:
    """The model and its sites, those not stored yet (a stored one is left as it is)."""
    insert_missing(store, [row], ("id",))
    insert_missing(store, [Site(model_id=row.id, name=n, width=w) for n, w in sites.items()], ("model_id", "name"))


def upsert_sae(store: Store, row: SAERow) -> None:
    """The SAE, unless it is stored already."""
    insert_missing(store, [row], ("id",))


def write_corpus(
    store: Store,
    row: Corpus,
    doc_names: Sequence[str],
    tokens: np.ndarray,
    doc_idx: np.ndarray,
    offsets: np.ndarray,
    chunk: int = 4096,
    on_commit: Callable[[], None] | None = None,
) -> dict[int, int]:
    """Store the corpus slice and its contexts (skipping those already there); return context idx -> row id.

    `on_commit` is called after each transaction (the corpus with its documents, then each chunk of contexts)."""
    with store.session() as s:
        if s.get(Corpus, row.id) is None:
            s.add(row)
            s.flush()
            s.execute(
                insert(Document),
                [{"corpus_id": row.id, "idx": i, "name": n} for i, n in enumerate(doc_names)],
            )
            s.commit()
            if on_commit is not None:
                on_commit()
    with store.session() as s:
        have = s.exec(select(func.count()).select_from(Context).where(Context.corpus_id == row.id)).one()
    # Contexts are inserted in index order in chunks, so an interrupted insert leaves a prefix: resume from it.
    for start in range(int(have), len(tokens), chunk):
        stop = min(start + chunk, len(tokens))
        rows = [
            {
                "corpus_id": row.id,
                "idx": i,
                "doc_idx": int(doc_idx[i]),
                "offset": int(offsets[i]),
                "tokens": pack_i32(tokens[i]),
            }
            for i in range(start, stop)
        ]
        with store.session() as s:
            if _fast_path(s.connection()) == "copy":
                _copy(s, "context", list(rows[0]), (tuple(r.values()) for r in rows))
            else:
                s.execute(insert(Context.__table__), rows)  # type: ignore[attr-defined]
            s.commit()
        if on_commit is not None:
            on_commit()
    with store.session() as s:
        pairs = s.exec(select(Context.idx, Context.id).where(Context.corpus_id == row.id)).all()
    return {int(i): int(cid) for i, cid in pairs if cid is not None}


# (context row id, role, split, rank, bin, max_act, float16 little-endian acts bytes): one record as a tuple.
RecordRow = tuple[int, str, str, int, int | None, float, bytes]
_RECORD_COLUMNS = ("feature_id", "context_id", "role", "split", "rank", "bin", "max_act", "acts")


@dataclass(frozen=True)
class RecordBatch:
    """Records as columns, one entry per record: how a collection hands hundreds of thousands of them over.

    Building a Python tuple per record cost more than SQLite's insert; from columns, `rows` makes the tuples in C.
    """

    feature: np.ndarray  # int: position of the record's feature in the features written with it
    context_id: np.ndarray  # int: context row id
    role: np.ndarray  # str
    split: np.ndarray  # str
    rank: np.ndarray  # int
    bin: np.ndarray  # int quantile bin, -1 for none
    max_act: np.ndarray  # float
    acts: np.ndarray  # [n, P] float16

    def rows(self, feature_ids: Sequence[int]) -> Iterator[tuple[Any, ...]]:
        """Insert tuples in _RECORD_COLUMNS order, given the row id of each feature position."""
        n, width = self.acts.shape
        bins = self.bin.astype(object)
        bins[self.bin < 0] = None
        # One tobytes for all records, split per record by viewing each row as one opaque item.
        blobs = np.ascontiguousarray(self.acts, dtype="<f2").view(np.dtype((np.void, 2 * width))).reshape(n)
        return zip(
            np.asarray(feature_ids, dtype=np.int64)[self.feature].tolist(),
            self.context_id.tolist(),
            self.role.tolist(),
            self.split.tolist(),
            self.rank.tolist(),
            bins.tolist(),
            self.max_act.tolist(),
            blobs.tolist(),
            strict=True,
        )


# SQLite's oldest limit on bound variables per statement is 999.
_SQLITE_MAX_VARS = 999
FastPath = Literal["sqlite", "copy"]


def _fast_path(conn: Any) -> FastPath | None:
    """The bulk path of the connection's database: "sqlite" (multi-row inserts on the raw cursor), "copy"
    (PostgreSQL's binary COPY through psycopg), or None for the portable one (a function, so tests can force it)."""
    dialect = dialect_of(conn)
    if dialect.sqlite:
        return "sqlite"
    if dialect.postgresql and dialect.driver == "psycopg":
        return "copy"
    return None


def _bulk_insert(s: Any, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
    """Insert rows through the driver's own cursor, inside the session's transaction.

    SQLAlchemy's per-row parameter processing costs more than SQLite itself, and the raw cursor takes an
    iterator, so the rows never all exist at once. On SQLite, many rows go in per statement: the sqlite3 module
    binds, steps and resets a statement (releasing the GIL) per execution, which costs about as much as the insert.
    On PostgreSQL they are COPYed.
    """
    conn = s.connection()
    path = _fast_path(conn)
    if path == "copy":
        _copy(s, table, columns, rows)
        return
    cols = ", ".join(f'"{c}"' for c in columns)
    cur = conn.connection.cursor()
    try:
        if path != "sqlite":
            ph = "?" if conn.dialect.paramstyle == "qmark" else "%s"
            cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({', '.join([ph] * len(columns))})", rows)
            return
        one = f"({', '.join('?' * len(columns))})"
        per = max(1, _SQLITE_MAX_VARS // len(columns))
        it = iter(rows)
        while flat := list(chain.from_iterable(islice(it, per))):
            cur.execute(f"INSERT INTO {table} ({cols}) VALUES {', '.join([one] * (len(flat) // len(columns)))}", flat)
    finally:
        cur.close()


_PG_JSON, _PG_TEXT = 114, 25  # type oids


def _copy(s: Any, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
    """COPY rows into `table` in PostgreSQL's binary format, inside the session's transaction.

    Binary COPY costs a quarter of text COPY on both sides (no hex-encoded bytea, no number parsing) and about
    half of pipelined INSERTs, but each value must be in the column's exact binary form: the types are read from
    the live table, not assumed, and integers are range-checked (see `_checked_int_dumpers`). JSON values come
    encoded, and go as their text (json's binary form is its text).
    """
    cur = s.connection().connection.cursor()
    try:
        cur.execute(
            "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped",
            (table,),
        )
        oid = dict(cur.fetchall())
        for dumper in _checked_int_dumpers():
            cur.adapters.register_dumper(None, dumper)  # this cursor only, and only where set_types names the oid
        cols = ", ".join(f'"{c}"' for c in columns)
        with cur.copy(f'COPY "{table}" ({cols}) FROM STDIN (FORMAT BINARY)') as copy:
            copy.set_types([_PG_TEXT if oid[c] == _PG_JSON else oid[c] for c in columns])
            for row in rows:
                copy.write_row(row)
    finally:
        cur.close()


@functools.cache
def _checked_int_dumpers() -> tuple[type, ...]:
    """Binary dumpers of smallint, integer and bigint that refuse a value out of range, as the server does for an
    INSERT: psycopg's own (C) ones wrap it silently (2**31 + 5 went in as -2**31 + 5). They cost about 0.3 us a
    value. psycopg is imported here, not at import time: it is an extra."""
    import struct

    import psycopg
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    def checked(type_oid: int, fmt: str, name: str) -> type:
        pack = struct.Struct(fmt).pack

        class Checked(Dumper):
            format = Format.BINARY
            oid = type_oid

            def dump(self, obj: Any) -> bytes:
                try:
                    return pack(obj)
                except struct.error:
                    raise psycopg.DataError(f"{obj!r} does not fit PostgreSQL's {name} (COPY)") from None

        return Checked

    return checked(21, "!h", "smallint"), checked(23, "!i", "integer"), checked(20, "!q", "bigint")


@dataclass(frozen=True)
class FeatureRow:
    model_id: str
    site: str
    source: str
    index: int
    status: str
    max_act: float
    mean_act: float
    density: float
    n_tokens: int
    histogram: dict[str, Any]
    corpus_id: str
    run_id: int
    records: Sequence[RecordRow] = ()

    @property
    def key(self) -> str:
        return feature_key(self.model_id, self.site, self.source, self.index)


def feature_key(model_id: str, site: str, source: str, index: int) -> str:
    return f"{model_id}/{site}/{source}/{index}"


def _insert_features(s: Any, rows: list[dict[str, Any]]) -> None:
    """Insert feature rows (dicts of the same keys) exactly as SQLAlchemy would, faster on SQLite and PostgreSQL.

    The columns' own bind processors make the values (SQLite) and the driver inserts them: half of the cost was
    JSON-encoding each histogram's 49 float edges, a list every feature of a source shares, so its encoding is
    reused (`_dumps_reusing`) once it is checked equal to the processor's output (on PostgreSQL, where SQLAlchemy
    hands psycopg the object to encode with json.dumps: to json.dumps' output). Elsewhere SQLAlchemy does it all.
    """
    conn = s.connection()
    dialect = conn.dialect
    path = _fast_path(conn)
    if path is None:
        s.execute(insert(Feature), rows)
        return
    table = Feature.__table__  # type: ignore[attr-defined]
    columns = list(rows[0])
    j = columns.index("histogram")
    memo: dict[int, str] = {}
    first = rows[0]["histogram"]
    if path == "sqlite":
        procs = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns]
        to_json = procs[j]
        if to_json is not None and to_json(first) == _dumps_reusing(first, memo):
            procs[j] = lambda v: _dumps_reusing(v, memo)
    else:  # COPY: plain values (aware datetimes, as UTCDateTime binds them), the JSON as the engine encodes it
        procs = [None] * len(columns)
        dumps = json_for_postgresql
        reuse = dumps(first) == _dumps_reusing(first, memo, dumps)
        procs[j] = (lambda v: _dumps_reusing(v, memo, dumps)) if reuse else dumps
    _bulk_insert(
        s,
        "feature",
        columns,
        (tuple(v if f is None else f(v) for v, f in zip(r.values(), procs, strict=True)) for r in rows),
    )


def _dumps_reusing(value: Any, memo: dict[int, str], dumps: Callable[[Any], str] = json.dumps) -> str:
    """dumps(value) for a dict with str keys, reusing the encoding of list values already seen. By identity: the
    memo lives for one insert, while the rows and their lists are alive and unchanged."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return dumps(value)
    parts = []
    for k, v in value.items():
        enc = memo.get(id(v)) if isinstance(v, list) else None
        if enc is None:
            enc = dumps(v)
            if isinstance(v, list):
                memo[id(v)] = enc
        parts.append(f"{json.dumps(k)}: {enc}")
    return "{" + ", ".join(parts) + "}"


def write_features(store: Store, features: Iterable[FeatureRow], records: RecordBatch | None = None) -> int:
    """Upsert features and replace their records, all in one transaction. Existing feature ids are kept.

    Records come with each feature (`FeatureRow.records`) or, in bulk, as a `RecordBatch` whose `feature`
    column indexes `features`.
    """
    feats = list(features)
    if not feats:
        return 0
    with store.session() as s:
        existing = dict(
            s.exec(select(Feature.key, Feature.id).where(among(store, col(Feature.key), [f.key for f in feats]))).all()
        )
        if existing:
            s.execute(delete(Record).where(among(store, col(Record.feature_id), existing.values())))
        stats = [
            {
                "key": f.key,
                "model_id": f.model_id,
                "site": f.site,
                "source": f.source,
                "index": f.index,
                "status": f.status,
                "max_act": f.max_act,
                "mean_act": f.mean_act,
                "density": f.density,
                "n_tokens": f.n_tokens,
                "histogram": f.histogram,
                "corpus_id": f.corpus_id,
                "run_id": f.run_id,
                "created_at": utcnow(),
            }
            for f in feats
        ]
        new = [r for r in stats if r["key"] not in existing]
        if new:
            _insert_features(s, new)
        for r in stats:
            if r["key"] in existing:
                s.execute(update(Feature).where(col(Feature.id) == existing[r["key"]]).values(**r))
        keys = among(store, col(Feature.key), [f.key for f in feats])
        id_of = dict(s.exec(select(Feature.key, Feature.id).where(keys)).all())
        ids = [cast(int, id_of[f.key]) for f in feats]  # ids exist: the rows were just written
        rows: Iterable[tuple[Any, ...]] = ((fid, *r) for f, fid in zip(feats, ids, strict=True) for r in f.records)
        if records is not None and len(records.feature):
            rows = chain(rows, records.rows(ids))
        _bulk_insert(s, "record", _RECORD_COLUMNS, rows)
        s.commit()
    return len(feats)
