"""The explanations' sentence embeddings in the database (`explanation_embedding`, made with the query schema):
one float16 vector per ok explanation and encoder, computed once. A backfill claims the rows it will embed first (a
placeholder row, dim 0, written in one short transaction), so two processes never embed the same explanations; a
claim whose process died is taken over after CLAIM_TTL. query/embeddings.py computes them; this module is their SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Connection

from autointerp.store.engine import Store
from autointerp.store.search import _OK
from autointerp.store.tables import utcnow

CLAIM_TTL = timedelta(minutes=10)  # a backfill claim older than this is its dead process's: taken over
_DONE_OR_CLAIMED = "(dim > 0 OR created_at >= :cutoff)"


def embedding_counts(store: Store, model: str) -> tuple[int, int]:
    """(ok explanations, embeddings by `model` and live claims on them): equal when every ok explanation is
    embedded or being embedded (embeddings of deleted explanations go with them, and ok explanations stay ok)."""
    with store.engine.connect() as conn:
        n_ok = conn.exec_driver_sql(f"SELECT count(*) FROM explanation WHERE {_OK}").scalar_one()
        n_emb = conn.execute(
            text(f"SELECT count(*) FROM explanation_embedding WHERE model = :m AND {_DONE_OR_CLAIMED}"),
            {"m": model, "cutoff": utcnow() - CLAIM_TTL},
        ).scalar_one()
    return int(n_ok), int(n_emb)


def unembedded(store: Store, model: str) -> list[tuple[int, str]]:
    """(id, text) of the ok explanations that have no embedding (nor a claim) by `model`, by id."""
    with store.engine.connect() as conn:
        return _unembedded(conn, model, None)


def _unembedded(conn: Connection, model: str, limit: int | None) -> list[tuple[int, str]]:
    rows = conn.execute(
        text(
            "SELECT e.id, e.text FROM explanation e LEFT JOIN explanation_embedding m "
            "ON m.explanation_id = e.id AND m.model = :m WHERE e.status = 'ok' AND e.text IS NOT NULL "
            "AND m.explanation_id IS NULL ORDER BY e.id" + ("" if limit is None else f" LIMIT {int(limit)}")
        ),
        {"m": model},
    ).all()
    return [(int(i), str(t)) for i, t in rows]


def claim_unembedded(store: Store, model: str, limit: int) -> list[tuple[int, str]]:
    """Claim up to `limit` ok explanations that no process has embedded by `model` or is embedding: (id, text),
    by id. A claim is a placeholder row (dim 0, no vector) written in one short transaction under the write lock
    (SQLite) or an advisory lock (PostgreSQL), so concurrent backfills never take the same rows; claims older than
    CLAIM_TTL are dropped first (their process died). `write_embeddings` fills them, `release_claims` gives them up."""
    now = utcnow()
    with store.engine.begin() as conn:
        store.dialect.one_at_a_time(conn, "autointerp.embedding_claims")
        conn.execute(
            text("DELETE FROM explanation_embedding WHERE model = :m AND dim = 0 AND created_at < :cutoff"),
            {"m": model, "cutoff": now - CLAIM_TTL},
        )
        todo = _unembedded(conn, model, limit)
        if todo:
            conn.execute(
                text(
                    "INSERT INTO explanation_embedding (explanation_id, model, dim, vector, created_at) "
                    "VALUES (:i, :m, 0, :v, :t)"
                ),
                [{"i": i, "m": model, "v": b"", "t": now} for i, _t in todo],
            )
    return todo


def release_claims(store: Store, model: str, ids: Sequence[int]) -> None:
    """Give up the claims on `ids` that were not filled (the encoder failed): another backfill takes them."""
    if not ids:
        return
    with store.engine.begin() as conn:
        cond, bound = store.dialect.among_sql("explanation_id", ids, "q_ids")
        conn.execute(
            text(f"DELETE FROM explanation_embedding WHERE model = :m AND dim = 0 AND {cond}").bindparams(bound),
            {"m": model},
        )


def write_embeddings(store: Store, model: str, ids: Sequence[int], vectors: np.ndarray) -> None:
    """Store float16 copies of `vectors` (one row per id) in one transaction, filling claims; an id already
    embedded (by a concurrent backfill) is left as it is."""
    blobs = np.ascontiguousarray(vectors, dtype="<f2")
    rows = [
        {"i": int(i), "m": model, "d": int(blobs.shape[1]), "v": blobs[k].tobytes(), "t": utcnow()}
        for k, i in enumerate(ids)
    ]
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO explanation_embedding (explanation_id, model, dim, vector, created_at) "
                "VALUES (:i, :m, :d, :v, :t) ON CONFLICT (explanation_id, model) DO UPDATE SET dim = excluded.dim, "
                "vector = excluded.vector, created_at = excluded.created_at WHERE explanation_embedding.dim = 0"
            ),
            rows,
        )


def embedding_state(store: Store, model: str) -> tuple[int, int]:
    """(count, largest explanation id) of the embeddings by `model`: what says a cached matrix is current."""
    with store.engine.connect() as conn:
        n, top = conn.execute(
            text("SELECT count(*), max(explanation_id) FROM explanation_embedding WHERE model = :m AND dim > 0"),
            {"m": model},
        ).one()
    return int(n), int(top or 0)


def read_embeddings(store: Store, model: str, after: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 matrix) of the embeddings by `model` of explanations with id > `after`, by id."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT explanation_id, vector FROM explanation_embedding WHERE model = :m AND explanation_id > :a "
                "AND dim > 0 ORDER BY explanation_id"
            ),
            {"m": model, "a": after},
        ).all()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    flat = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype="<f2")
    return ids, flat.reshape(len(rows), -1).astype(np.float32)
