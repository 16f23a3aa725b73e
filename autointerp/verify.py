"""The causal check of explanations (the `intervene` stage): steer each explained feature, let a judge that sees only
the explanation pick the steered continuation, and give every explanation a verdict.

Per feature (once, whatever the number of its explanations), stored as an `intervention` row:
1. calibrate the strength (mode add by default) so that the mean next-token KL over fixed neutral prompts reaches
   the target (intervene.calibrate);
2. the direct effects: top promoted / suppressed output tokens of the feature's direction (intervene.direct_effects);
3. greedy baseline and steered continuations of `n_prompts` neutral verification prompts (fixed seed); baselines
   are the same for every feature of a model and computed once per run;
4. the feature's own activation on those continuations, read by the unsteered model through the collector's site
   capture (subject.sites.capture): does the steered text make the feature fire more?

Per explanation, stored as a `score` row with method "intervention": the judge is shown the explanation and an
unlabeled pair (Text A / Text B) and must name the text that shows the concept. The steered text is A for every other
shown pair and B for the rest, so position bias cancels (a judge that always says "A" scores exactly 0.5 over an even
number of pairs). A pair whose two texts are identical is not shown (outcome `same`). Answers are parsed strictly
(A, B or tie); a tie or an unparsable answer is recorded as such, a failed LLM call as a failure: none of them count
as right or wrong. Score = accuracy over decided pairs with a Jeffreys interval (score.choice_accuracy) and the exact
binomial p-value against chance 0.5.

Verdict per explanation (a `verdict` row, recomputed each run because correlational scores may arrive later):
- contradicted: the judge picks the baseline significantly more often than chance (interval's upper end < 0.5):
  steering the feature moves the text away from the explained concept. Steered text that does not make the feature
  fire more is NOT a contradiction: input-side features (those that detect a concept without writing it) are
  common, and their steering rarely produces text that triggers them; it leaves the explanation unverified;
- verified: the best correlational score passes (simulation, else detection / fuzzing; thresholds in config) and
  the causal check passes (interval's lower end above `min_causal_ci_low`, activation increase above
  `min_act_increase` x the feature's max activation);
- unverified: otherwise (the reason says what is missing).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlmodel import col, select

from autointerp.config import RunConfig, config_hash
from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, Failure
from autointerp.prompts import Prompt, load_prompt
from autointerp.score import ScoreResult, binomial_p_value, choice_accuracy
from autointerp.store.engine import Store
from autointerp.store.explanations import ExplanationView, explanations_for
from autointerp.store.interventions import (
    METHOD,
    correlational_scores,
    final_scores,
    get_intervention,
    write_intervention,
    write_score,
    write_verdict,
)
from autointerp.store.queries import select_features
from autointerp.store.tables import Explanation, Feature, InterventionRow, Score, Verdict

Progress = Callable[[str, int, int], None]
Answer = Literal["A", "B", "tie"]
Outcome = Literal["correct", "wrong", "tie", "unparsable", "failed", "same"]
CHANCE = 0.5

# Neutral, topic-free openings continued with and without the intervention (the calibration uses the different
# intervene.NEUTRAL_PROMPTS, so the strength is not tuned on the texts the judge reads).
VERIFY_PROMPTS: tuple[str, ...] = (
    "When I woke up this morning, I",
    "The best part of the day was",
    "My friend asked me what I",
    "Here are a few things to know about",
    "After a long walk, we decided to",
    "The letter on the table said",
    "It was the first time that",
    "I have always wondered why",
    "The meeting began with a few words about",
    "On the way home, she told me",
    "This is a short note about",
    "We talked for hours about",
    "The old book on the shelf was",
    "Everyone in the room was thinking about",
    "He opened the door and saw",
    "The next chapter is about",
)


# ---------------------------------------------------------------------------------------------- judge


_ANSWER = re.compile(r"^(?:answer\s*:\s*)?(?:text\s+)?(a|b|tie|neither|both)\s*[.!]?$", re.IGNORECASE)


def parse_judgement(text: str) -> Answer | None:
    """The judge's choice from its answer: 'A', 'B' or 'tie' (also 'neither' / 'both'); None if unparsable.

    Strict: the first non-empty line, stripped of quotes, asterisks and an 'Answer:' or 'Text' prefix, must be
    exactly one of those words (a final period allowed). Anything else ("A and B", "I think A") is unparsable.
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip("\"'*` ")
    m = _ANSWER.match(line)
    if m is None:
        return None
    word = m.group(1).lower()
    if word == "a":
        return "A"
    if word == "b":
        return "B"
    return "tie"


@dataclass(frozen=True)
class Pair:
    """One verification prompt's two continuations."""

    prompt: str
    baseline: str
    steered: str


@dataclass(frozen=True)
class Judgement:
    pair: int
    """Index of the pair (the verification prompt)."""
    outcome: Outcome
    steered_first: bool | None = None
    """The steered text was shown as Text A; None when the pair was not shown (outcome `same`)."""
    answer: str | None = None
    """The judge's answer as received."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair,
            "outcome": self.outcome,
            "steered_first": self.steered_first,
            "answer": self.answer,
            "error": self.error,
        }


def shown(text: str) -> str:
    """A continuation as the judge sees it: one line (newlines spelled \\n), stripped; '(nothing)' when empty."""
    line = text.replace("\r", "").replace("\n", "\\n").replace("\t", " ").strip()
    return line or "(nothing)"


def judge_plan(pairs: Sequence[Pair]) -> list[tuple[int, bool]]:
    """(pair index, steered shown first) of every pair to show: pairs with identical texts are left out, and the
    steered text goes first on every other shown pair, so it is first and second equally often."""
    show = [i for i, p in enumerate(pairs) if shown(p.baseline) != shown(p.steered)]
    return [(i, j % 2 == 0) for j, i in enumerate(show)]


def judge_request(prompt: Prompt, explanation: str, pair: Pair, steered_first: bool, max_tokens: int) -> ChatRequest:
    a, b = (pair.steered, pair.baseline) if steered_first else (pair.baseline, pair.steered)
    messages = prompt.render(explanation=explanation.strip(), text_a=shown(a), text_b=shown(b))
    return ChatRequest(messages, max_tokens=max_tokens, temperature=0.0)


def _outcome(answer: Answer | None, steered_first: bool) -> Outcome:
    if answer is None:
        return "unparsable"
    if answer == "tie":
        return "tie"
    return "correct" if (answer == "A") == steered_first else "wrong"


def judge_many(
    client: LLMClient, prompt: Prompt, items: Sequence[tuple[str, Sequence[Pair]]], max_tokens: int
) -> list[list[Judgement]]:
    """Judge every (explanation, pairs) item in one batched call; one list of judgements per item, one per pair."""
    reqs: list[ChatRequest] = []
    where: list[tuple[int, int, bool]] = []
    out: list[list[Judgement]] = []
    for k, (explanation, pairs) in enumerate(items):
        plan = dict(judge_plan(pairs))
        out.append([Judgement(i, "same") for i in range(len(pairs)) if i not in plan])
        for i, first in plan.items():
            reqs.append(judge_request(prompt, explanation, pairs[i], first, max_tokens))
            where.append((k, i, first))
    results = client.chat_many(reqs) if reqs else []
    for (k, i, first), res in zip(where, results, strict=True):
        if isinstance(res, Failure):
            out[k].append(Judgement(i, "failed", first, None, f"{res.kind}: {res.error}"))
        else:
            out[k].append(Judgement(i, _outcome(parse_judgement(res.text), first), first, res.text))
    return [sorted(js, key=lambda j: j.pair) for js in out]


@dataclass(frozen=True)
class CausalResult:
    status: Literal["ok", "undefined", "failed"]
    score: ScoreResult
    p_value: float | None
    counts: dict[str, int]
    reason: str | None = None

    @property
    def n_failed(self) -> int:
        return self.counts.get("failed", 0)


def causal_score(judgements: Sequence[Judgement], *, alpha: float = 0.05) -> CausalResult:
    """Accuracy of the judge over decided pairs (correct / wrong), with its interval and p-value against chance.

    ok when some pair was decided; failed when every shown pair's call failed; undefined otherwise (no pair shown,
    or only ties and unparsable answers)."""
    counts = {o: 0 for o in ("correct", "wrong", "tie", "unparsable", "failed", "same")}
    for j in judgements:
        counts[j.outcome] += 1
    correct = [True if j.outcome == "correct" else False if j.outcome == "wrong" else None for j in judgements]
    res = choice_accuracy([c for j, c in zip(judgements, correct, strict=True) if j.outcome != "same"], alpha=alpha)
    n_shown = len(judgements) - counts["same"]
    if res.value is not None:
        k, n = counts["correct"], counts["correct"] + counts["wrong"]
        return CausalResult("ok", res, binomial_p_value(k, n, CHANCE), counts)
    if n_shown == 0:
        why = "the intervention left every continuation unchanged: nothing to judge"
        return CausalResult("undefined", res, None, counts, why)
    if counts["failed"] == n_shown:
        return CausalResult("failed", res, None, counts, f"every judge call failed ({n_shown})")
    why = (
        f"no decided pair: {counts['tie']} ties, {counts['unparsable']} unparsable answers, "
        f"{counts['failed']} failed calls"
    )
    return CausalResult("undefined", res, None, counts, why)


# ---------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Evidence:
    """The correlational score a verdict rests on."""

    method: str
    value: float
    score_id: int | None = None


def best_correlational(scores: Sequence[Any]) -> Evidence | None:
    """The best simulation score; without one, the best detection or fuzzing score (defined scores only)."""
    usable = [s for s in scores if s.value is not None and s.status == "ok"]
    pool = [s for s in usable if s.method == "simulation"] or [
        s for s in usable if s.method in ("detection", "fuzzing")
    ]
    if not pool:
        return None
    best = max(pool, key=lambda s: s.value)
    return Evidence(best.method, float(best.value), getattr(best, "id", None))


@dataclass(frozen=True)
class Thresholds:
    min_causal_ci_low: float = 0.5
    min_act_increase: float = 0.0
    min_simulation: float = 0.3
    min_classification: float = 0.65


def decide(
    corr: Evidence | None,
    causal_status: str,
    ci_low: float | None,
    ci_high: float | None,
    act_increase: float | None,
    th: Thresholds,
) -> tuple[str, str]:
    """(verdict, reason) of one explanation from its figures (see the module docstring)."""
    if causal_status == "ok" and ci_high is not None and ci_high < CHANCE:
        why = f"the judge picked the baseline text more often than chance (interval up to {ci_high:.2f})"
        return "contradicted", why
    missing = []
    if corr is None:
        missing.append("no correlational score")
    else:
        need = th.min_simulation if corr.method == "simulation" else th.min_classification
        if corr.value < need:
            missing.append(f"{corr.method} {corr.value:.2f} < {need:.2f}")
    if causal_status != "ok" or ci_low is None:
        missing.append(f"causal check {causal_status}")
    elif not ci_low > th.min_causal_ci_low:
        missing.append(f"judge accuracy interval starts at {ci_low:.2f}, not above {th.min_causal_ci_low:.2f}")
    if act_increase is None:
        missing.append("feature activation on the continuations unknown")
    elif not act_increase > th.min_act_increase:
        missing.append(f"activation increase {act_increase:+.3f} x max not above {th.min_act_increase:+.3f}")
    if missing:
        return "unverified", "; ".join(missing)
    assert corr is not None and ci_low is not None and act_increase is not None
    why = f"{corr.method} {corr.value:.2f}, judge accuracy interval from {ci_low:.2f}"
    return "verified", f"{why}, activation {act_increase:+.3f} x max"


# ---------------------------------------------------------------------------------------------- identities


def start_position(cfg: RunConfig) -> int:
    """First position an intervention touches: after BOS and the positions the collector never records."""
    return 1 + cfg.collect.skip_positions


def intervention_settings(cfg: RunConfig) -> dict[str, Any]:
    """Everything that changes an intervention row's numbers; its hash is the row's key."""
    from autointerp.intervene import NEUTRAL_PROMPTS

    c = cfg.intervene
    return {
        "mode": c.mode,
        "target_kl": c.target_kl,
        "kl_tol": c.kl_tol,
        "max_evals": c.max_evals,
        "start": start_position(cfg),
        "max_new_tokens": c.max_new_tokens,
        "seed": c.seed,
        "top_tokens": c.top_tokens,
        "dtype": cfg.model.dtype,
        "calibration_prompts": list(NEUTRAL_PROMPTS),
        "prompts": list(VERIFY_PROMPTS[: c.n_prompts]),
    }


@dataclass(frozen=True)
class Identity:
    """What a run's rows are keyed by."""

    intervention_config: dict[str, Any]
    intervention_hash: str
    judge: str
    prompt: str
    prompt_hash: str
    score_config: dict[str, Any]
    score_hash: str
    verdict_config: dict[str, Any]
    verdict_hash: str
    thresholds: Thresholds


def identity(cfg: RunConfig, judge: str, prompt: Prompt) -> Identity:
    c = cfg.intervene
    iv = intervention_settings(cfg)
    iv_hash = config_hash(iv)
    score = {"intervention_config_hash": iv_hash, "judge_max_tokens": c.judge_max_tokens, "alpha": c.alpha}
    th = Thresholds(c.min_causal_ci_low, c.min_act_increase, c.min_simulation, c.min_classification)
    verdict = {"judge": judge, "prompt_hash": prompt.hash, "score_config_hash": config_hash(score), **th.__dict__}
    return Identity(
        iv, iv_hash, judge, prompt.name, prompt.hash, score, config_hash(score), verdict, config_hash(verdict), th
    )


# ---------------------------------------------------------------------------------------------- the model part


@dataclass
class Counters:
    forward: int = 0
    generated: int = 0


class Measurer:
    """Steers features of one database: loads each subject model and SAE once and shares the baselines."""

    def __init__(self, cfg: RunConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self._subjects: dict[str, Any] = {}
        self._saes: dict[str, Any] = {}
        self._baselines: dict[str, list[Any]] = {}

    def subject(self, model_id: str) -> Any:
        if model_id not in self._subjects:
            from autointerp.intervene import subject_spec
            from autointerp.store.tables import SubjectModel
            from autointerp.subject.model import load_subject

            with self.store.session() as s:
                row = s.get(SubjectModel, model_id)
            spec = subject_spec(model_id, row.source if row else None)
            self._subjects[model_id] = load_subject(spec, device=self.cfg.model.device, dtype=self.cfg.model.dtype)
        return self._subjects[model_id]

    def target(self, subject: Any, f: Feature) -> Any:
        from autointerp.intervene import NEURONS, Latent, load_target
        from autointerp.store.tables import SAERow
        from autointerp.subject.sae import load_sae

        if f.source == NEURONS:
            return load_target(subject, f.site, f.source, f.index)
        if f.source not in self._saes:
            with self.store.session() as s:
                row = s.get(SAERow, f.source)
            if row is None:
                from autointerp.intervene import InterventionError

                raise InterventionError(f"SAE {f.source} of feature {f.key} is not in the database")
            self._saes[f.source] = load_sae(row.path, expected_site=f.site, device=str(subject.device))
        return Latent(self._saes[f.source], f.index)

    def baselines(self, model_id: str, subject: Any, counters: Counters) -> list[Any]:
        if model_id not in self._baselines:
            self._baselines[model_id] = self.generate(subject, [], counters)
        return self._baselines[model_id]

    def generate(self, subject: Any, interventions: Sequence[Any], counters: Counters) -> list[Any]:
        """Greedy continuations of the verification prompts, all prompts as the rows of one batch."""
        from autointerp.intervene import generate_many

        c = self.cfg.intervene
        gens = generate_many(subject, VERIFY_PROMPTS[: c.n_prompts], interventions, max_new_tokens=c.max_new_tokens)
        counters.forward += max((g.n_forward for g in gens), default=0)  # batched: the passes are shared
        counters.generated += sum(len(g.token_ids) for g in gens)
        return gens

    def measure(self, f: Feature, ident: Identity) -> InterventionRow:
        """Calibrate, compute direct effects, generate and read the feature's activation: one intervention row."""
        from autointerp.intervene import Intervention, calibrate, direct_effects

        assert f.id is not None
        t0 = time.perf_counter()
        c = self.cfg.intervene
        counters = Counters()
        subject = self.subject(f.model_id)
        target = self.target(subject, f)
        start = start_position(self.cfg)

        def make(s: float) -> Intervention:
            return Intervention(target, c.mode, s, start)

        initial = f.max_act if c.mode == "clamp" and f.max_act > 0 else 1.0
        cal = calibrate(subject, make, target_kl=c.target_kl, tol=c.kl_tol, initial=initial, max_evals=c.max_evals)
        counters.forward += cal.n_forward
        iv = make(cal.strength)
        eff = direct_effects(subject, target, k=c.top_tokens)
        base = self.baselines(f.model_id, subject, counters)
        steered = self.generate(subject, [iv], counters)
        acts = continuation_activations(subject, target, [*base, *steered])
        counters.forward += 1
        n = len(base)
        act_b, act_s = _pooled_mean(acts[:n]), _pooled_mean(acts[n:])
        increase = None
        if act_b is not None and act_s is not None and f.max_act > 0:
            increase = (act_s - act_b) / f.max_act
        samples = [
            {
                "prompt": b.prompt,
                "baseline": b.text,
                "steered": s.text,
                "baseline_tokens": len(b.token_ids),
                "steered_tokens": len(s.token_ids),
                "act_baseline": _mean(ab),
                "act_steered": _mean(ast),
            }
            for b, s, ab, ast in zip(base, steered, acts[:n], acts[n:], strict=True)
        ]

        def effects(es: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"token_id": e.token_id, "token": e.token, "value": e.value} for e in es]

        return InterventionRow(
            feature_id=f.id,
            mode=c.mode,
            config_hash=ident.intervention_hash,
            config=ident.intervention_config | {"trace": [list(p) for p in cal.trace]},
            status="ok",
            strength=cal.strength,
            target_kl=c.target_kl,
            kl=cal.kl,
            converged=cal.converged,
            start=start,
            promoted=effects(eff.promoted),
            suppressed=effects(eff.suppressed),
            samples=samples,
            act_baseline=act_b,
            act_steered=act_s,
            act_increase=increase,
            n_forward=counters.forward,
            n_generated=counters.generated,
            seconds=time.perf_counter() - t0,
        )


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _pooled_mean(rows: Sequence[Sequence[float]]) -> float | None:
    return _mean([x for r in rows for x in r])


def continuation_activations(subject: Any, target: Any, gens: Sequence[Any]) -> list[list[float]]:
    """The feature's activation at every generated token of each generation, read by the unsteered model through
    the collector's site capture, in one right-padded batch (causal attention never sees the padding)."""
    import torch

    from autointerp.subject.sites import capture

    seqs = [list(g.prompt_ids) + list(g.token_ids) for g in gens]
    if not seqs:
        return []
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), subject.bos_token_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    x = capture(subject.model, subject.arch, [target.site], ids.to(subject.device))[target.site]
    with torch.inference_mode():
        acts = target.activation(x.float()).cpu()
    return [acts[row, len(g.prompt_ids) : len(g.prompt_ids) + len(g.token_ids)].tolist() for row, g in enumerate(gens)]


# ---------------------------------------------------------------------------------------------- the stage


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


def select_explained(cfg: RunConfig, store: Store) -> tuple[list[Feature], dict[int, list[ExplanationView]], int]:
    """Selected features that have an ok explanation (of the configured explainer), their ok explanations, and how
    many selected features had none."""
    c = cfg.intervene
    q = select(Explanation.feature_id).where(Explanation.status == "ok")
    if c.explainer is not None:
        q = q.where(Explanation.explainer == c.explainer)
    with store.session() as s:
        explained = set(s.exec(q).all())
        if c.features.strip() == "explained":
            chosen = list(
                s.exec(
                    select(Feature)
                    .where(col(Feature.id).in_(explained), Feature.status == "ok")
                    .order_by(col(Feature.id))
                ).all()
            )
            without = 0
        else:
            chosen = select_features(store, c.features, seed=cfg.explain.seed)
            without = sum(f.id not in explained for f in chosen)
            chosen = [f for f in chosen if f.id in explained]
    chosen = chosen[: c.limit] if c.limit is not None else chosen
    ids = [f.id for f in chosen if f.id is not None]
    by_feature = {
        fid: [e for e in es if e.status == "ok" and (c.explainer is None or e.explainer == c.explainer)]
        for fid, es in explanations_for(store, ids).items()
    }
    return chosen, by_feature, without


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


def _verdict_row(
    e: ExplanationView, f: Feature, score: Score, corr: Evidence | None, act: float | None, ident: Identity
) -> Verdict:
    assert f.id is not None
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
    from autointerp.intervene import InterventionError
    from autointerp.subject.sae import SAEFormatError
    from autointerp.subject.sites import SiteError

    return (InterventionError, SAEFormatError, SiteError, OSError)


def run_intervene(
    cfg: RunConfig,
    store: Store,
    *,
    client: LLMClient | None = None,
    progress: Progress | None = None,
    measurer: Measurer | None = None,
) -> InterveneSummary:
    """Verify the selected explained features; idempotent (a rerun makes no judge call and no forward pass)."""
    from autointerp.wiring import make_client

    t0 = time.perf_counter()
    c = cfg.intervene
    client = client or make_client(cfg, store, c.llm, stage="intervene")
    prompt = load_prompt(c.prompt)
    ident = identity(cfg, client.name, prompt)
    measurer = measurer or Measurer(cfg, store)
    features, expls, without = select_explained(cfg, store)
    out = InterveneSummary(selected=len(features) + without, without_explanation=without)
    calls0, hits0 = client.calls, client.cache_hits
    for done, f in enumerate(features, 1):
        assert f.id is not None
        es = expls.get(f.id, [])
        out.explanations += len(es)
        finished = final_scores(
            store, [e.id for e in es], model=ident.judge, prompt_hash=ident.prompt_hash, config_hash=ident.score_hash
        )
        out.scores_reused += len(finished)
        iv = get_intervention(store, f.id, ident.intervention_hash)
        if iv is not None and iv.status == "ok":
            out.interventions_reused += 1
        else:
            try:
                row = measurer.measure(f, ident)
            except _catchable() as exc:
                row = InterventionRow(
                    feature_id=f.id,
                    mode=c.mode,
                    config_hash=ident.intervention_hash,
                    config=ident.intervention_config,
                    status="failed",
                    target_kl=c.target_kl,
                    error=f"{type(exc).__name__}: {exc}",
                )
            iv = write_intervention(store, row)
            if iv.status == "ok":
                out.interventions_new += 1
                out.forward_passes += iv.n_forward
                out.generated_tokens += iv.n_generated
            else:
                out.interventions_failed += 1
        if iv.status == "ok":
            todo = [e for e in es if e.id not in finished and e.text]
            pairs = [Pair(s["prompt"], s["baseline"], s["steered"]) for s in iv.samples]
            judged = judge_many(client, prompt, [(e.text or "", pairs) for e in todo], c.judge_max_tokens)
            for e, js in zip(todo, judged, strict=True):
                finished[e.id] = write_score(store, _score_row(e, f, iv, ident, js, causal_score(js, alpha=c.alpha)))
                out.scores_new += 1
            corr = correlational_scores(store, [e.id for e in es])
            for e in es:
                if e.id in finished:
                    best = best_correlational(corr[e.id])
                    v = write_verdict(store, _verdict_row(e, f, finished[e.id], best, iv.act_increase, ident))
                    out.verdicts[v.verdict] = out.verdicts.get(v.verdict, 0) + 1
        if progress is not None:
            progress("intervene", done, len(features))
    out.judge_calls = client.calls - calls0
    out.cache_hits = client.cache_hits - hits0
    out.seconds = time.perf_counter() - t0
    return out
