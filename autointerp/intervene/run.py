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

from autointerp.config import RunConfig
from autointerp.intervene.identity import Identity, identity
from autointerp.intervene.judge import CHANCE, CausalResult, Judgement, Pair, best_correlational, causal_score, decide
from autointerp.intervene.judge import judge_many as judge_pairs
from autointerp.intervene.measure import Measurer
from autointerp.jobs import Progress, Stage, Tally, make_client, run_stage
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


class InterveneStage(Stage[Feature]):
    name = "intervene"

    def __init__(self, cfg: RunConfig, store: Store, client: LLMClient, measurer: Measurer,
                 features: Sequence[Feature] | None = None) -> None:  # fmt: skip
        """`features`: the job runner's selection (explanations may still be on their way); by default the config's
        selection of explained features."""
        self.cfg, self.store, self.client, self.measurer = cfg, store, client, measurer
        c = cfg.intervene
        self.prompt = load_prompt(c.prompt)
        self.ident = identity(cfg, client.name, self.prompt)
        self.expls: dict[int, list[ExplanationView]] = {}
        self._ivs: dict[int, InterventionRow] = {}
        self._scores: dict[int, Score] = {}
        self._judged: set[int] = set()  # features whose verdicts this run has written
        if features is None:
            self.features, self.expls, without = select_explained(
                store, c.features, explainer=c.explainer, limit=c.limit, seed=cfg.explain.seed
            )
        else:
            self.features, without = list(features), 0
        self.summary = InterveneSummary(selected=len(self.features) + without, without_explanation=without)

    def run_config(self) -> dict[str, Any]:
        i = self.ident
        return {"intervention": i.intervention_config, "judge": i.judge, "prompt": i.prompt,
                "prompt_hash": i.prompt_hash, "score": i.score_config, "verdict": i.verdict_config}  # fmt: skip

    def units(self) -> Sequence[Feature]:
        return self.features

    def load(self, units: Sequence[Feature], *, explanations: bool = False) -> None:
        """Read the features' interventions and final intervention scores (and, for the job runner, their ok
        explanations of the configured explainer, which may have arrived since the run started)."""
        i, explainer = self.ident, self.cfg.intervene.explainer
        fids = [f.id for f in units if f.id is not None]
        if explanations:
            for fid, es in explanations_for(self.store, fids).items():
                self.expls[fid] = [e for e in es if e.status == "ok" and explainer in (None, e.explainer)]
        self._ivs.update(interventions_of(self.store, fids, i.intervention_hash))
        ids = [e.id for f in units for e in self.expls.get(f.id or -1, [])]
        found = final_scores(self.store, ids, model=i.judge, prompt_hash=i.prompt_hash, config_hash=i.score_hash)
        self._scores.update(found)

    def unfinished(self, f: Feature) -> bool:
        """The feature's intervention is not ok, or an explanation lacks its final intervention score (after load)."""
        iv = self._ivs.get(f.id or -1)
        ok = iv is not None and iv.status == "ok"
        return not (ok and all(e.id in self._scores for e in self.expls.get(f.id or -1, []) if e.text))

    def pending(self, units: Sequence[Feature]) -> list[Feature]:
        self.load(units)
        for f in units:
            es = self.expls.get(f.id or -1, [])
            self.summary.explanations += len(es)
            self.summary.scores_reused += sum(e.id in self._scores for e in es)
            iv = self._ivs.get(f.id or -1)
            self.summary.interventions_reused += int(iv is not None and iv.status == "ok")
        return [f for f in units if self.unfinished(f)]

    def run_chunk(self, chunk: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        outcomes: dict[int, str] = {}
        for f in chunk:
            assert f.id is not None
            if not self.expls.get(f.id):
                outcomes[f.id] = "skipped"  # no ok explanation of the configured explainer: nothing to check
                continue
            iv = self._ivs.get(f.id)
            if iv is None or iv.status != "ok":
                iv = self._measure(f, run_id)
                self._ivs[f.id] = iv
                tally.add("intervention", iv.status)
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
                self.summary.scores_new += 1
            scored = [self._scores.get(e.id) for e in self.expls[f.id] if e.text]
            outcomes[f.id] = "failed" if any(sc is None or sc.status == "failed" for sc in scored) else "ok"
        self.verdicts(chunk, run_id, tally)
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
                    self.summary.verdicts[v.verdict] = self.summary.verdicts.get(v.verdict, 0) + 1

    def _measure(self, f: Feature, run_id: int) -> InterventionRow:
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
        if iv.status == "ok":
            self.summary.interventions_new += 1
            self.summary.forward_passes += iv.n_forward
            self.summary.generated_tokens += iv.n_generated
        else:
            self.summary.interventions_failed += 1
        return iv

    def after(self, units: Sequence[Feature], run_id: int, tally: Tally) -> None:
        # The features finished before this run get their verdicts again: correlational scores may be newer.
        self.verdicts([f for f in units if f.id not in self._judged], run_id, tally)


def run_intervene(
    cfg: RunConfig,
    store: Store,
    *,
    client: LLMClient | None = None,
    progress: Progress | None = None,
    measurer: Measurer | None = None,
) -> InterveneSummary:
    """Verify the selected explained features; idempotent (a rerun makes no judge call and no forward pass)."""
    client = client or make_client(cfg, store, cfg.intervene.llm, stage="intervene")
    stage = InterveneStage(cfg, store, client, measurer or Measurer(cfg, store))
    calls0, hits0 = client.calls, client.cache_hits
    res = run_stage(store, stage, progress=progress)
    out = stage.summary
    out.judge_calls = client.calls - calls0
    out.cache_hits = client.cache_hits - hits0
    out.seconds = res.seconds
    out.run_id = res.run_id
    return out
