"""Sentence embeddings of the explanations, for semantic search: computed once per ok explanation (by the first
search that needs them), stored as float16 in the database, and held in memory as one float32 matrix per process,
read again only when the table grew.

Once means once however many searches ask at the same time: in a process, one backfill per database and encoder
runs while the other requests wait for it (then find nothing left); across processes, each backfill claims the
rows it embeds before encoding them (store/embeddings.py `claim_unembedded`), so another process skips them and
searches what is there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy.exc import DBAPIError

from autointerp.store.embeddings import (
    claim_unembedded,
    embedding_counts,
    embedding_state,
    read_embeddings,
    release_claims,
    write_embeddings,
)
from autointerp.store.engine import Store, StoreError, is_read_only
from autointerp.store.search import Filters, passing, require_query_schema

CHUNK = 512  # explanations embedded and written per transaction: an interrupted backfill keeps what it did


class Encoder(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, texts: list[str]) -> Any: ...


def _encoder(encoder: Encoder | None) -> Encoder:
    from autointerp.query.encoder import default_encoder

    return encoder if encoder is not None else default_encoder()


_BACKFILLS: dict[tuple[str, str], threading.Lock] = {}
_BACKFILLS_LOCK = threading.Lock()


def _backfill_lock(url: str, model: str) -> threading.Lock:
    with _BACKFILLS_LOCK:
        return _BACKFILLS.setdefault((url, model), threading.Lock())


def update_embeddings(
    store: Store, encoder: Encoder | None = None, progress: Callable[[str, int, int], None] | None = None
) -> int:
    """Embed the ok explanations that have no embedding by this encoder yet; returns how many this call embedded
    (0 when a concurrent call did them). Identical texts are encoded once. A count comparison first, so an
    up-to-date database costs two counts. A database this process cannot write gets nothing embedded: search by
    meaning then covers the explanations embedded already."""
    return _backfill(store, _encoder(encoder), progress)[0]


def _backfill(store: Store, enc: Encoder, progress: Callable[[str, int, int], None] | None) -> tuple[int, int]:
    """(embedded by this call, ok explanations left without an embedding because the database refused the write)."""
    require_query_schema(store)
    n_ok, n_emb = embedding_counts(store, enc.name)
    if n_ok == n_emb:
        return 0, 0
    done = 0
    with _backfill_lock(store.url, enc.name):  # the others wait here, then find the rows done or claimed
        while True:
            try:
                part = claim_unembedded(store, enc.name, CHUNK)
            except (DBAPIError, StoreError) as exc:
                if is_read_only(exc):
                    return done, n_ok - n_emb - done
                raise
            if not part:
                return done, 0
            ids = [i for i, _t in part]
            try:
                texts = sorted({t for _i, t in part})
                vecs = np.asarray(enc.encode(texts), dtype=np.float32)
                row = {t: k for k, t in enumerate(texts)}
                write_embeddings(store, enc.name, ids, vecs[[row[t] for _i, t in part]])
            except BaseException:
                with contextlib.suppress(Exception):  # else the claims expire after CLAIM_TTL
                    release_claims(store, enc.name, ids)
                raise
            done += len(part)
            if progress is not None:
                progress("embed", done, max(done, n_ok - n_emb))


@dataclass
class _Matrix:
    ids: np.ndarray  # explanation ids, ascending
    vecs: np.ndarray  # float32 [n, dim], unit rows
    state: tuple[int, int]  # (count, max id) it was read at


_CACHE: dict[tuple[str, str], _Matrix] = {}
_CACHE_LOCK = threading.Lock()


def matrix(store: Store, model: str) -> _Matrix:
    """The embeddings of `model` as one matrix, cached per database: reused while the table's (count, max id) is
    unchanged, extended by the rows past the cached max id when those are all that is new, else read again."""
    key = (store.url, model)
    state = embedding_state(store, model)
    with _CACHE_LOCK:
        got = _CACHE.get(key)
    if got is not None and got.state == state:
        return got
    if got is not None and state[1] > got.state[1]:
        ids, vecs = read_embeddings(store, model, after=got.state[1])
        if len(got.ids) + len(ids) == state[0]:
            got = _Matrix(np.concatenate([got.ids, ids]), np.concatenate([got.vecs, vecs]), state)
        else:
            got = None
    else:
        got = None
    if got is None:
        ids, vecs = read_embeddings(store, model)
        got = _Matrix(ids, vecs, (len(ids), int(ids[-1]) if len(ids) else 0))
    with _CACHE_LOCK:
        _CACHE[key] = got
    return got


def nearest(
    store: Store, query: str, f: Filters, limit: int, encoder: Encoder | None = None
) -> tuple[list[tuple[int, float]], int]:
    """(explanation id, cosine similarity) of the `limit` explanations closest in meaning to `query` that pass
    the filters, best first (ties by id); and how many ok explanations it could not see (a read-only database
    without their embeddings). Embeds what is not embedded yet first."""
    enc = _encoder(encoder)
    _done, unseen = _backfill(store, enc, None)
    m = matrix(store, enc.name)
    if not len(m.ids):
        return [], unseen
    q = np.asarray(enc.encode([query]), dtype=np.float32)[0]
    sims = m.vecs @ q
    # Candidates best first; with filters, widen until enough pass (a rare filter reads more rows).
    want = limit if not f.active else max(4 * limit, 200)
    while True:
        k = min(want, len(sims))
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        top = top[np.lexsort((m.ids[top], -sims[top]))]
        ids = m.ids[top].tolist()
        # Past a few thousand ids one pass over the filtered rows is cheaper than binding them all.
        keep = set(ids) if not f.active else passing(store, ids if k <= 5000 else None, f)
        hits = [(i, float(sims[t])) for i, t in zip(ids, top, strict=True) if i in keep]
        if len(hits) >= limit or k == len(sims):
            return hits[:limit], unseen
        want *= 8
