"""The intervene stage on the work loop: the causal check of every explained feature, and a verdict for each of
its explanations.

A unit is a feature. Per feature (once, whatever the number of its explanations) the model part (measure.py)
writes an `intervention` row; per explanation the judge (judge.py) writes a `score` row with method
"intervention". A feature is finished when its intervention is ok and every explanation has a final intervention
score, so a rerun makes no judge call and no forward pass. Verdicts are recomputed for every selected feature at
the end of each run (no model, no LLM), since correlational scores may arrive after the causal check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from autointerp.config import RunConfig, config_hash
from autointerp.intervene.identity import Identity, identity
from autointerp.intervene.judge import CHANCE, CausalResult, Judgement, Pair, best_correlational, causal_score, decide
from autointerp.intervene.judge import judge_many as judge_pairs
from autointerp.intervene.measure import Measurer
from autointerp.jobs import Progress, Stage, Tally, make_client
from autointerp.jobs.loop import Job
from autointerp.jobs.stage import TYPICAL_EXPLANATION
from autointerp.llm.client import LLMClient
from autointerp.prompts import load_prompt
from autointerp.store.engine import Store
from autointerp.store.explanations import ExplanationView, explanations_for
from autointerp.store.interventions import (
    METHOD,
    correlational_scores,
    final_scores,
    interventions_of,
    write_intervention,
    write_score,
    write_verdict,
)
from autointerp.store.queries import select_explained
from autointerp.store.tables import Feature, InterventionRow, Score, Verdict


@dataclass
class InterveneSummary:
    selected: int = 0
    without_explanation: int = 0
    explanations: int = 0
    interventions_new: int = 0
    interventions_reused: int = 0
    interventions_failed: int = 0
    scores_new: int = 0
    scores_reused: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    judge_calls: int = 0
    cache_hits: int = 0
    forward_passes: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    run_id: int | None = None


def _score_row(
    e: ExplanationView, f: Feature, iv: InterventionRow, ident: Identity, js: list[Judgement], res: CausalResult
) -> Score:
    assert f.id is not None
    return Score(
        explanation_id=e.id,
        feature_id=f.id,
        method=METHOD,
        model=ident.judge,
        prompt=ident.prompt,
        prompt_hash=ident.prompt_hash,
        config_hash=ident.score_hash,
        config=ident.score_config,
        status=res.status,
        value=res.score.value,
        ci_low=res.score.ci_low,
        ci_high=res.score.ci_high,
        n=res.score.n,
        n_failed=res.n_failed,
        reason=res.reason,
        details={
            "intervention_id": iv.id,
            "counts": res.counts,
            "p_value": res.p_value,
            "chance": CHANCE,
            "act_increase": iv.act_increase,
            "judgements": [j.to_dict() for j in js],
        },
    )


def _verdict_row(e: ExplanationView, f: Feature, score: Score, scores: Sequence[Any], act: float | None,
                 ident: Identity) -> Verdict:  # fmt: skip
    assert f.id is not None
    corr = best_correlational(scores)
    verdict, reason = decide(corr, score.status, score.ci_low, score.ci_high, act, ident.thresholds)
    return Verdict(
        explanation_id=e.id,
        feature_id=f.id,
        verdict=verdict,
        reason=reason,
        causal_score_id=score.id,
        causal_value=score.value,
        causal_ci_low=score.ci_low,
        causal_ci_high=score.ci_high,
        act_increase=act,
        correlational_score_id=corr.score_id if corr else None,
        correlational_method=corr.method if corr else None,
        correlational_value=corr.value if corr else None,
        config_hash=ident.verdict_hash,
        config=ident.verdict_config,
    )


def _catchable() -> tuple[type[BaseException], ...]:
    """What a feature's model part may raise that is the feature's failure, not a bug: stored as a failed row."""
    from autointerp.intervene.hooks import InterventionError
    from autointerp.subject.sae import SAEFormatError
    from autointerp.subject.sites import SiteError

    return (InterventionError, SAEFormatError, SiteError, OSError)


class InterveneStage(Stage):
    """A unit is a feature, for one intervention, judge and verdict identity."""

    name = "intervene"
    label = "intervene"

    def __init__(self, cfg: RunConfig, store: Store, client: LLMClient, measurer: Measurer) -> None:
        self.cfg, self.store, self.client, self.measurer = cfg, store, client, measurer
        c = cfg.intervene
        self.prompt = load_prompt(c.prompt)
        self.ident = identity(cfg, client.name, self.prompt)
        i = self.ident
        self.identity = config_hash({"intervention": i.intervention_hash, "score": i.score_hash,
                                     "verdict": i.verdict_hash})  # fmt: skip
        self.llm = c.llm
        self.expls: dict[int, list[ExplanationView]] = {}
        self._ivs: dict[int, InterventionRow] = {}
        self._scores: dict[int, Score] = {}
        self._judged: set[int] = set()  # features whose verdicts this process has written
        self.summary = InterveneSummary()  # what planning found done before (the rest comes from the job's tally)

    @classmethod
    def build(cls, cfg: RunConfig, store: Store) -> list[Stage]:
        client = make_client(cfg, store, cfg.intervene.llm, stage="intervene")
        return [cls(cfg, store, client, Measurer(cfg, store))]

    @classmethod
    def select(cls, cfg: RunConfig, store: Store) -> list[Feature]:
        return select_explained(store, cfg.intervene.features, explainer=cfg.intervene.explainer,
                                limit=cfg.intervene.limit, seed=cfg.explain.seed)[0]  # fmt: skip

    def clients(self) -> list[LLMClient]:
        return [self.client]

    def run_config(self) -> dict[str, Any]:
        i = self.ident
        return {"intervention": i.intervention_config, "judge": i.judge, "prompt": i.prompt,
                "prompt_hash": i.prompt_hash, "score": i.score_config, "verdict": i.verdict_config}  # fmt: skip

    def prepare(self, features: Sequence[Feature]) -> None:
        """Read the features' ok explanations of the configured explainer (they may have arrived since planning),
        their interventions and their final intervention scores."""
        i, explainer = self.ident, self.cfg.intervene.explainer
        fids = [f.id for f in features if f.id is not None]
        found = explanations_for(self.store, fids)
        for fid in fids:
            es = found.get(fid, [])
            self.expls[fid] = [e for e in es if e.status == "ok" and explainer in (None, e.explainer)]
        self._ivs.update(interventions_of(self.store, fids, i.intervention_hash))
        ids = [e.id for f in features for e in self.expls.get(f.id or -1, [])]
        self._scores.update(final_scores(self.store, ids, model=i.judge, prompt_hash=i.prompt_hash,
                                         config_hash=i.score_hash))  # fmt: skip

    def unfinished(self, f: Feature) -> bool:
        """The feature's intervention is not ok, or an explanation lacks its final intervention score."""
        iv = self._ivs.get(f.id or -1)
        ok = iv is not None and iv.status == "ok"
        return not (ok and all(e.id in self._scores for e in self.expls.get(f.id or -1, []) if e.text))

    def pending(self, features: Sequence[Feature]) -> set[int]:
        self.prepare(features)
        for f in features:
            es = self.expls.get(f.id or -1, [])
            self.summary.explanations += len(es)
            self.summary.scores_reused += sum(e.id in self._scores for e in es)
            iv = self._ivs.get(f.id or -1)
            self.summary.interventions_reused += int(iv is not None and iv.status == "ok")
        return {f.id for f in features if f.id is not None and self.unfinished(f)}

    def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        outcomes: dict[int, str] = {}
        for f in features:
            assert f.id is not None
            if not self.expls.get(f.id):
                outcomes[f.id] = "skipped"  # no ok explanation of the configured explainer: nothing to check
                continue
            iv = self._ivs.get(f.id)
            if iv is None or iv.status != "ok":
                iv = self._measure(f, run_id, tally)
                self._ivs[f.id] = iv
            if iv.status != "ok":
                outcomes[f.id] = "failed"
                continue
            todo = [e for e in self.expls.get(f.id, []) if e.id not in self._scores and e.text]
            pairs = [Pair(s["prompt"], s["baseline"], s["steered"]) for s in iv.samples]
            c = self.cfg.intervene
            judged = judge_pairs(self.client, self.prompt, [(e.text or "", pairs) for e in todo], c.judge_max_tokens)
            for e, js in zip(todo, judged, strict=True):
                row = _score_row(e, f, iv, self.ident, js, causal_score(js, alpha=c.alpha))
                row.run_id = run_id
                self._scores[e.id] = write_score(self.store, row)
                tally.add("score:intervention", row.status)
            scored = [self._scores.get(e.id) for e in self.expls[f.id] if e.text]
            outcomes[f.id] = "failed" if any(sc is None or sc.status == "failed" for sc in scored) else "ok"
        self.verdicts(features, run_id, tally)
        return outcomes

    def verdicts(self, features: Sequence[Feature], run_id: int, tally: Tally) -> None:
        """A verdict for every explanation of the features with an ok intervention and a final causal score, from
        the latest correlational scores."""
        ids = [e.id for f in features for e in self.expls.get(f.id or -1, []) if e.id in self._scores]
        corr = correlational_scores(self.store, ids)
        for f in features:
            iv = self._ivs.get(f.id or -1)
            if f.id is None or iv is None or iv.status != "ok":
                continue
            self._judged.add(f.id)
            for e in self.expls.get(f.id, []):
                if e.id in self._scores:
                    row = _verdict_row(e, f, self._scores[e.id], corr.get(e.id, []), iv.act_increase, self.ident)
                    row.run_id = run_id
                    v = write_verdict(self.store, row)
                    tally.add("verdict", v.verdict)

    def _measure(self, f: Feature, run_id: int, tally: Tally) -> InterventionRow:
        assert f.id is not None
        c, i = self.cfg.intervene, self.ident
        try:
            row = self.measurer.measure(f, i)
        except _catchable() as exc:
            row = InterventionRow(feature_id=f.id, mode=c.mode, config_hash=i.intervention_hash,
                                  config=i.intervention_config, status="failed", target_kl=c.target_kl,
                                  error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        row.run_id = run_id
        iv = write_intervention(self.store, row)
        tally.add("intervention", iv.status)
        if iv.status == "ok":
            tally.counters["forward_passes"] += iv.n_forward
            tally.counters["generated_tokens"] += iv.n_generated
        return iv

    def after(self, features: Sequence[Feature], run_id: int, tally: Tally) -> None:
        # The features finished before this run get their verdicts again: correlational scores may be newer.
        rest = [f for f in features if f.id not in self._judged]
        self.prepare(rest)
        self.verdicts(rest, run_id, tally)

    def sample_requests(self, features: Sequence[Feature], client: Any) -> None:
        """The judge sees the explanation and two continuations of max_new_tokens each, n_prompts times."""
        c = self.cfg.intervene
        filler = " ".join(["word"] * c.max_new_tokens)
        pairs = [Pair(f"prompt {i}", filler, filler + " more") for i in range(c.n_prompts)]
        for f in features:
            n_expl = max(1, len(self.expls.get(f.id or -1, [])))
            judge_pairs(client, self.prompt, [(TYPICAL_EXPLANATION, pairs)] * n_expl, c.judge_max_tokens)


def run_intervene(
    cfg: RunConfig,
    store: Store,
    *,
    client: LLMClient | None = None,
    progress: Progress | None = None,
    measurer: Measurer | None = None,
) -> InterveneSummary:
    """`autointerp intervene`: a job with one part over the selected explained features (idempotent: a rerun
    makes no judge call and no forward pass)."""
    client = client or make_client(cfg, store, cfg.intervene.llm, stage="intervene")
    stage = InterveneStage(cfg, store, client, measurer or Measurer(cfg, store))
    c = cfg.intervene
    features, _expls, without = select_explained(store, c.features, explainer=c.explainer, limit=c.limit,
                                                 seed=cfg.explain.seed)  # fmt: skip
    res = Job(cfg, store, parts=[stage], features=features, progress=progress).run()
    part = res.parts[stage.label]
    out = stage.summary
    ivs = part.rows.get("intervention", {})
    out.selected, out.without_explanation = len(features) + without, without
    out.interventions_new = ivs.get("ok", 0)
    out.interventions_failed = sum(n for st, n in ivs.items() if st != "ok")
    out.scores_new = sum(part.rows.get("score:intervention", {}).values())
    out.verdicts = part.rows.get("verdict", {})
    out.forward_passes = part.counters.get("forward_passes", 0)
    out.generated_tokens = part.counters.get("generated_tokens", 0)
    out.judge_calls, out.cache_hits = res.spent.calls, res.cache_hits
    out.seconds, out.run_id = res.seconds, part.run_id
    return out
