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

from autointerp.config import RunConfig, config_hash
from autointerp.explain.explainers import EXPLAINERS, Explainer, token_frequencies
from autointerp.jobs import Progress, Stage, Tally, make_client
from autointerp.jobs.loop import Job
from autointerp.llm.client import LLMClient
from autointerp.records import FeatureExamples, decoder, feature_examples, train_records
from autointerp.store.engine import Store
from autointerp.store.explanations import done_feature_ids, write_explanations
from autointerp.store.queries import corpus_token_ids, feature_by_key, feature_detail
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


class ExplainStage(Stage):
    """A unit is a feature, for one explainer identity (model, prompt hash, config hash)."""

    name = "explain"

    def __init__(self, cfg: RunConfig, store: Store, explainer: Explainer) -> None:
        self.cfg, self.store, self.explainer = cfg, store, explainer
        self.ident = explainer.identity
        self.label = f"explain:{self.ident.explainer}"
        self.identity = config_hash(self.ident.key())
        self.chunk_size = cfg.explain.chunk
        self.llm = cfg.explain.llm if explainer.clients() else None

    @classmethod
    def build(cls, cfg: RunConfig, store: Store) -> list[Stage]:
        return [cls(cfg, store, build_explainer(cfg, store, kind=name)) for name in cfg.run.explainers]

    def clients(self) -> list[LLMClient]:
        return self.explainer.clients()

    def run_config(self) -> dict[str, Any]:
        return {**self.ident.key(), "prompt": self.ident.prompt, "config": self.ident.config}

    def pending(self, features: Sequence[Feature]) -> set[int]:
        done = done_feature_ids(self.store, self.ident.key())
        return {f.id for f in features if f.id is not None and f.id not in done}

    def _examples(self, f: Feature) -> FeatureExamples:
        c = self.cfg.explain
        assert f.id is not None
        recs = train_records(feature_detail(self.store, f.key).records, c.n_top, c.n_quantile)
        return feature_examples(f.id, f.key, f.max_act, f.density, recs, decoder(self.store, f.model_id), c.window)

    def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        rows = []
        for f, o in zip(features, self.explainer.explain([self._examples(f) for f in features]), strict=True):
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

    def sample_requests(self, features: Sequence[Feature], client: Any) -> None:
        requests = self.explainer.requests([self._examples(f) for f in features]) if self.clients() else []
        if requests:
            client.chat_many(requests)


def run_explain(
    cfg: RunConfig,
    store: Store,
    *,
    explainer: Explainer | None = None,
    progress: Progress | None = None,
) -> ExplainSummary:
    """`autointerp explain`: a job with one part, over explain.features (at most explain.limit)."""
    stage = ExplainStage(cfg, store, explainer or build_explainer(cfg, store))
    res = Job(cfg, store, parts=[stage], features=stage.select(cfg, store), progress=progress).run()
    part = res.parts[stage.label]
    return ExplainSummary(
        selected=part.selected,
        already_done=part.selected - part.pending,
        counts=part.rows.get("explanation", {}),
        llm_calls=res.spent.calls,
        cache_hits=res.cache_hits,
        seconds=res.seconds,
        run_id=part.run_id,
    )
