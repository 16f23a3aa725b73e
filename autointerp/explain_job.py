"""The `explain` stage over many features: select, load train examples, explain in chunks, store rows.

Rows are committed per chunk, so an interrupted job loses at most one chunk, and the LLM response cache makes
redoing that chunk free. A rerun skips every feature that already has a final row for the same explainer
identity (model, prompt hash, config hash); failed rows are tried again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from sqlmodel import select

from autointerp.config import RunConfig
from autointerp.explain import (
    EXPLAINERS,
    Explainer,
    LLMExplainer,
    TokenExplainer,
    feature_examples,
    pick_examples,
    token_frequencies,
)
from autointerp.prompts import load_prompt
from autointerp.store.blobs import unpack_i32
from autointerp.store.engine import Store
from autointerp.store.explanations import done_feature_ids, write_explanations
from autointerp.store.queries import feature_detail, select_features
from autointerp.store.tables import Context, Explanation, Feature, SubjectModel
from autointerp.wiring import make_client

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ExplainSummary:
    selected: int
    already_done: int
    counts: dict[str, int]
    llm_calls: int
    cache_hits: int
    seconds: float


@lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    from autointerp.subject.model import load_tokenizer

    return load_tokenizer(source)


def _decoder(store: Store, model_id: str) -> Callable[..., list[str]]:
    from autointerp.subject.tokens import token_strings

    with store.session() as s:
        row = s.get(SubjectModel, model_id)
    tok = _tokenizer(row.source if row is not None else model_id)
    return lambda ids: token_strings(tok, ids)


def corpus_frequencies(store: Store) -> Callable[[str], dict[str, float]]:
    """Feature key -> token frequencies of the corpus its records come from (computed once per corpus)."""
    cache: dict[str, dict[str, float]] = {}

    def for_feature(key: str) -> dict[str, float]:
        with store.session() as s:
            f = s.exec(select(Feature).where(Feature.key == key)).one()
            if f.corpus_id not in cache:
                blobs = s.exec(select(Context.tokens).where(Context.corpus_id == f.corpus_id)).all()
                ids = np.concatenate([unpack_i32(b)[1:] for b in blobs]) if blobs else np.zeros(0, np.int64)
                decode = _decoder(store, f.model_id)
                cache[f.corpus_id] = token_frequencies(ids, lambda t: decode([t])[0])
        return cache[f.corpus_id]

    return for_feature


def build_explainer(cfg: RunConfig, store: Store, kind: str | None = None, llm: str | None = None) -> Explainer:
    kind = kind or cfg.explain.explainer
    if kind not in EXPLAINERS:
        raise ValueError(f"unknown explainer {kind!r}: choose one of {', '.join(EXPLAINERS)}")
    if kind == TokenExplainer.name:
        return TokenExplainer(cfg.explain, corpus_frequencies(store))
    client = make_client(cfg, store, llm or cfg.explain.llm, stage="explain")
    return LLMExplainer(cfg.explain, client, load_prompt(cfg.explain.prompt))


def run_explain(
    cfg: RunConfig,
    store: Store,
    *,
    explainer: Explainer | None = None,
    progress: Progress | None = None,
) -> ExplainSummary:
    import time

    t0 = time.perf_counter()
    ex = explainer or build_explainer(cfg, store)
    ident = ex.identity
    key = {
        "explainer": ident.explainer,
        "model": ident.model,
        "prompt_hash": ident.prompt_hash,
        "config_hash": ident.config_hash,
    }
    chosen = select_features(store, cfg.explain.features, limit=cfg.explain.limit, seed=cfg.explain.seed)
    done = done_feature_ids(store, key)
    todo = [f for f in chosen if f.id not in done]
    counts: dict[str, int] = {}
    step = cfg.explain.chunk
    for start in range(0, len(todo), step):
        chunk = todo[start : start + step]
        fxs = []
        for f in chunk:
            assert f.id is not None
            detail = feature_detail(store, f.key)
            recs = pick_examples(detail.records, cfg.explain)
            decode = _decoder(store, f.model_id)
            fxs.append(feature_examples(f.id, f.key, f.max_act, f.density, recs, decode, cfg.explain.window))
        outcomes = ex.explain(fxs)
        rows = []
        for f, o in zip(chunk, outcomes, strict=True):
            assert f.id is not None
            counts[o.status] = counts.get(o.status, 0) + 1
            rows.append(
                Explanation(
                    feature_id=f.id,
                    explainer=ident.explainer,
                    model=ident.model,
                    prompt=ident.prompt,
                    prompt_hash=ident.prompt_hash,
                    config_hash=ident.config_hash,
                    config=ident.config,
                    status=o.status,
                    text=o.text,
                    error=o.error,
                    raw=o.raw,
                    n_records=o.n_records,
                    prompt_tokens=o.prompt_tokens,
                    attempts=o.attempts,
                )
            )
        write_explanations(store, rows)
        if progress is not None:
            progress("explain", min(start + step, len(todo)), len(todo))
    client = getattr(ex, "client", None)
    return ExplainSummary(
        selected=len(chosen),
        already_done=len(chosen) - len(todo),
        counts=counts,
        llm_calls=client.calls if client is not None else 0,
        cache_hits=client.cache_hits if client is not None else 0,
        seconds=time.perf_counter() - t0,
    )
