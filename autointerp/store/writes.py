"""Idempotent writes used by the stages. Bulk paths use SQLAlchemy Core (ORM objects cost ~10x per row)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, insert, update
from sqlmodel import col, func, select

from autointerp.store.blobs import pack_i32
from autointerp.store.engine import Store
from autointerp.store.tables import (
    Context,
    Corpus,
    Document,
    Feature,
    Record,
    Run,
    SAERow,
    Site,
    SubjectModel,
    utcnow,
)


def upsert_model(store: Store, row: SubjectModel, sites: dict[str, int]) -> None:
    with store.session() as s:
        if s.get(SubjectModel, row.id) is None:
            s.add(row)
            s.flush()
        for name, width in sites.items():
            found = s.exec(select(Site).where(Site.model_id == row.id, Site.name == name)).first()
            if found is None:
                s.add(Site(model_id=row.id, name=name, width=width))
        s.commit()


def upsert_sae(store: Store, row: SAERow) -> None:
    with store.session() as s:
        if s.get(SAERow, row.id) is None:
            s.add(row)
            s.commit()


def write_corpus(
    store: Store,
    row: Corpus,
    doc_names: Sequence[str],
    tokens: np.ndarray,
    doc_idx: np.ndarray,
    offsets: np.ndarray,
    chunk: int = 4096,
) -> dict[int, int]:
    """Store the corpus slice and its contexts (skipping those already there); return context idx -> row id."""
    with store.session() as s:
        if s.get(Corpus, row.id) is None:
            s.add(row)
            s.flush()
            s.execute(
                insert(Document),
                [{"corpus_id": row.id, "idx": i, "name": n} for i, n in enumerate(doc_names)],
            )
            s.commit()
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
            s.execute(insert(Context.__table__), rows)  # type: ignore[attr-defined]
            s.commit()
    with store.session() as s:
        pairs = s.exec(select(Context.idx, Context.id).where(Context.corpus_id == row.id)).all()
    return {int(i): int(cid) for i, cid in pairs if cid is not None}


def get_or_create_run(store: Store, stage: str, key: str, config: dict[str, Any], total: int) -> Run:
    with store.session() as s:
        run = s.exec(select(Run).where(Run.key == key)).first()
        if run is None:
            run = Run(stage=stage, key=key, config=config, total=total)
            s.add(run)
            s.commit()
            s.refresh(run)
        return run


def update_run(store: Store, run_id: int, **values: Any) -> None:
    if values.get("status") in ("done", "failed"):
        values.setdefault("finished_at", utcnow())
    with store.session() as s:
        s.execute(update(Run).where(col(Run.id) == run_id).values(**values))
        s.commit()


# (context row id, role, split, rank, bin, max_act, float16 little-endian acts bytes): a tuple, because a
# collection writes hundreds of thousands of them.
RecordRow = tuple[int, str, str, int, int | None, float, bytes]
_RECORD_COLUMNS = ("feature_id", "context_id", "role", "split", "rank", "bin", "max_act", "acts")


def _bulk_insert(s: Any, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    """executemany on the driver: SQLAlchemy's per-row parameter processing costs more than SQLite itself."""
    conn = s.connection()
    style = conn.dialect.paramstyle
    ph = "?" if style == "qmark" else "%s"
    cols = ", ".join(f'"{c}"' for c in columns)
    conn.exec_driver_sql(f"INSERT INTO {table} ({cols}) VALUES ({', '.join([ph] * len(columns))})", rows)


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
    records: Sequence[RecordRow]

    @property
    def key(self) -> str:
        return feature_key(self.model_id, self.site, self.source, self.index)


def feature_key(model_id: str, site: str, source: str, index: int) -> str:
    return f"{model_id}/{site}/{source}/{index}"


def write_features(store: Store, features: Iterable[FeatureRow]) -> int:
    """Upsert features and replace their records, all in one transaction. Existing feature ids are kept."""
    feats = list(features)
    if not feats:
        return 0
    with store.session() as s:
        existing = dict(
            s.exec(select(Feature.key, Feature.id).where(col(Feature.key).in_([f.key for f in feats]))).all()
        )
        if existing:
            s.execute(delete(Record).where(col(Record.feature_id).in_(list(existing.values()))))
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
            s.execute(insert(Feature), new)
        for r in stats:
            if r["key"] in existing:
                s.execute(update(Feature).where(col(Feature.id) == existing[r["key"]]).values(**r))
        ids = dict(s.exec(select(Feature.key, Feature.id).where(col(Feature.key).in_([f.key for f in feats]))).all())
        rows = [(fid, *r) for f in feats for fid in (ids[f.key],) for r in f.records]
        if rows:
            _bulk_insert(s, "record", _RECORD_COLUMNS, rows)
        s.commit()
    return len(feats)
