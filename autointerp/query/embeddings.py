"""Sentence embeddings of the explanations, for semantic search: computed once per ok explanation (the new ones
after `explain`, or at the first search that needs them), stored as float16 in the database, and held in memory
as one float32 matrix per process, read again only when the table grew."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from autointerp.store.engine import Store
from autointerp.store.search import (
    Filters,
    embedding_counts,
    embedding_state,
    ensure_query_schema,
    passing,
    read_embeddings,
    unembedded,
    write_embeddings,
)

CHUNK = 512  # explanations embedded and written per transaction: an interrupted backfill keeps what it did


class Encoder(Protocol):
    @property
    def name(self) -> str: ...

    def encode(self, texts: list[str]) -> Any: ...


def _encoder(encoder: Encoder | None) -> Encoder:
    from autointerp.query.encoder import default_encoder

    return encoder if encoder is not None else default_encoder()


def update_embeddings(
    store: Store, encoder: Encoder | None = None, progress: Callable[[str, int, int], None] | None = None
) -> int:
    """Embed the ok explanations that have no embedding by this encoder yet; returns how many. Identical texts
    are encoded once. A count comparison first, so an up-to-date database costs two counts."""
    ensure_query_schema(store)
    enc = _encoder(encoder)
    n_ok, n_emb = embedding_counts(store, enc.name)
    if n_ok == n_emb:
        return 0
    todo = unembedded(store, enc.name)
    for start in range(0, len(todo), CHUNK):
        part = todo[start : start + CHUNK]
        texts = sorted({t for _i, t in part})
        vecs = np.asarray(enc.encode(texts), dtype=np.float32)
        row = {t: k for k, t in enumerate(texts)}
        write_embeddings(store, enc.name, [i for i, _t in part], vecs[[row[t] for _i, t in part]])
        if progress is not None:
            progress("embed", start + len(part), len(todo))
    return len(todo)


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
) -> list[tuple[int, float]]:
    """(explanation id, cosine similarity) of the `limit` explanations closest in meaning to `query` that pass
    the filters, best first (ties by id). Embeds what is not embedded yet first."""
    enc = _encoder(encoder)
    update_embeddings(store, enc)
    m = matrix(store, enc.name)
    if not len(m.ids):
        return []
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
            return hits[:limit]
        want *= 8
