"""The explain stage on the work loop: a unit is a feature, for one explainer identity (model, prompt hash,
config hash).

Rows are committed per chunk, so an interrupted job loses at most one chunk, and the LLM response cache makes
redoing that chunk free. A rerun skips every feature that already has a final row (ok or skipped) for the same
identity; failed rows are tried again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autointerp.config import RunConfig
from autointerp.explain.explainers import EXPLAINERS, Explainer, token_frequencies
from autointerp.jobs import Progress, Stage, Tally, make_client, run_stage
from autointerp.records import decoder, feature_examples, train_records
from autointerp.store.engine import Store
from autointerp.store.explanations import done_feature_ids, write_explanations
from autointerp.store.queries import corpus_token_ids, feature_by_key, feature_detail, select_features
from autointerp.store.tables import Explanation, Feature


@dataclass(frozen=True)
class ExplainSummary:
    selected: int
    already_done: int
    counts: dict[str, int]
    llm_calls: int
    cache_hits: int
    seconds: float
    run_id: int | None = None


def corpus_frequencies(store: Store) -> Callable[[str], dict[str, float]]:
    """Feature key -> token frequencies of the corpus its records come from (computed once per corpus)."""
    cache: dict[str, dict[str, float]] = {}

    def for_feature(key: str) -> dict[str, float]:
        f = feature_by_key(store, key)
        if f.corpus_id not in cache:
            decode = decoder(store, f.model_id)
            cache[f.corpus_id] = token_frequencies(corpus_token_ids(store, f.corpus_id), lambda t: decode([t])[0])
        return cache[f.corpus_id]

    return for_feature


def build_explainer(cfg: RunConfig, store: Store, kind: str | None = None, llm: str | None = None) -> Explainer:
    """The explainer `kind` (default explain.explainer) of the registry EXPLAINERS, with the stage's LLM client when
    it needs one ([llm.NAME] block `llm`, default explain.llm)."""
    kind = kind or cfg.explain.explainer
    cls = EXPLAINERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown explainer {kind!r}: choose one of {', '.join(EXPLAINERS)}")
    client = make_client(cfg, store, llm or cfg.explain.llm, stage="explain") if cls.needs_llm else None
    return cls.build(cfg.explain, store, client)


class ExplainStage(Stage[Feature]):
    name = "explain"

    def __init__(self, cfg: RunConfig, store: Store, explainer: Explainer) -> None:
        self.cfg, self.store, self.explainer = cfg, store, explainer
        self.ident = explainer.identity
        self.chunk_size = cfg.explain.chunk

    def run_config(self) -> dict[str, Any]:
        return {**self.ident.key(), "prompt": self.ident.prompt, "config": self.ident.config}

    def units(self) -> Sequence[Feature]:
        c = self.cfg.explain
        return select_features(self.store, c.features, limit=c.limit, seed=c.seed)

    def pending(self, units: Sequence[Feature]) -> list[Feature]:
        done = done_feature_ids(self.store, self.ident.key())
        return [f for f in units if f.id not in done]

    def run_chunk(self, chunk: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        c = self.cfg.explain
        fxs = []
        for f in chunk:
            assert f.id is not None
            recs = train_records(feature_detail(self.store, f.key).records, c.n_top, c.n_quantile)
            fxs.append(feature_examples(f.id, f.key, f.max_act, f.density, recs, decoder(self.store, f.model_id),
                                        c.window))  # fmt: skip
        rows = []
        for f, o in zip(chunk, self.explainer.explain(fxs), strict=True):
            assert f.id is not None
            tally.add("explanation", o.status)
            rows.append(
                Explanation(
                    feature_id=f.id,
                    explainer=self.ident.explainer,
                    **self.ident.row_fields(),
                    status=o.status,
                    text=o.text,
                    error=o.error,
                    raw=o.raw,
                    n_records=o.n_records,
                    prompt_tokens=o.prompt_tokens,
                    attempts=o.attempts,
                    run_id=run_id,
                )
            )
        write_explanations(self.store, rows)
        return {r.feature_id: r.status for r in rows}


def run_explain(
    cfg: RunConfig,
    store: Store,
    *,
    explainer: Explainer | None = None,
    progress: Progress | None = None,
) -> ExplainSummary:
    ex = explainer or build_explainer(cfg, store)
    res = run_stage(store, ExplainStage(cfg, store, ex), progress=progress)
    client = getattr(ex, "client", None)
    return ExplainSummary(
        selected=res.selected,
        already_done=res.selected - res.pending,
        counts=res.rows.get("explanation", {}),
        llm_calls=client.calls if client is not None else 0,
        cache_hits=client.cache_hits if client is not None else 0,
        seconds=res.seconds,
        run_id=res.run_id,
    )
