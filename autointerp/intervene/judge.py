"""The judge and the verdicts of the causal check.

The judge is shown an explanation and an unlabeled pair of continuations (Text A / Text B: baseline and steered)
and must name the text that shows the concept. A pair whose two texts are identical is not shown (outcome `same`).
Answers are parsed strictly (A, B or tie); a tie or an unparsable answer is recorded as such, a failed LLM call as a
failure: none of them count as right or wrong.

Balance: the steered text is A on every other shown pair. With an odd number of shown pairs the last one is shown a
second time, in the other order, so the steered text is A in exactly half the showings whatever the count. Each pair
counts once: its credit is 1 (right) or 0 (wrong), and a pair shown twice gets the mean of its decided showings (1/2
when the judge answered by position alone). A judge that always says "A" (or "B") thus scores exactly 0.5 for any
number of shown pairs. Score = the mean credit over decided pairs (an accuracy over pairs, n = decided pairs, never
showings, since two showings of one pair are not independent trials) with a Jeffreys interval
(metrics.choice_accuracy) and the exact binomial p-value against chance 0.5 over the pairs with a whole credit (a
pair split 1/2 is a tie, left out as the sign test leaves out ties).

Verdict per explanation:
- contradicted: the judge picks the baseline significantly more often than chance (interval's upper end < 0.5):
  steering the feature moves the text away from the explained concept. Steered text that does not make the feature
  fire more is NOT a contradiction: input-side features (those that detect a concept without writing it) are
  common, and their steering rarely produces text that triggers them; it leaves the explanation unverified;
- verified: the best correlational score passes (the first tier of autointerp.methods.evidence() with a score:
  simulation, else detection / fuzzing; the threshold by the method's kind, in config) and
  the causal check passes (interval's lower end above `min_causal_ci_low`, activation increase above
  `min_act_increase` x the feature's max activation);
- unverified: otherwise (the reason says what is missing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from autointerp import methods
from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, Failure
from autointerp.metrics import ScoreResult, binomial_p_value, choice_accuracy
from autointerp.prompts import Prompt

Answer = Literal["A", "B", "tie"]
Outcome = Literal["correct", "wrong", "tie", "unparsable", "failed", "same"]
CHANCE = 0.5
# The balancing rule in words; it is part of the intervention score's config hash, so scores computed under
# another rule (before: alternate only, which favoured an always-"A" judge on odd counts) are not reused.
BALANCING = "alternate; odd count: the last pair also in the other order; credit per pair = mean of its showings"


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
    """(pair index, steered shown first) of every showing: pairs with identical texts are left out, the steered text
    goes first on every other shown pair, and an odd count shows its last pair again in the other order, so the
    steered text is first and second equally often (see the module docstring)."""
    show = [i for i, p in enumerate(pairs) if shown(p.baseline) != shown(p.steered)]
    plan = [(i, j % 2 == 0) for j, i in enumerate(show)]
    if len(show) % 2:
        plan.append((show[-1], False))  # the last pair went first (even position): now second
    return plan


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
        plan = judge_plan(pairs)
        planned = {i for i, _ in plan}
        out.append([Judgement(i, "same") for i in range(len(pairs)) if i not in planned])
        for i, first in plan:
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


def pair_credits(judgements: Sequence[Judgement]) -> list[float | None]:
    """One credit per shown pair (in pair order): the mean of its decided showings (correct 1, wrong 0), None when
    none of its showings was decided. Pairs not shown (`same`) have none."""
    by_pair: dict[int, list[float]] = {}
    for j in judgements:
        if j.outcome != "same":
            got = by_pair.setdefault(j.pair, [])
            if j.outcome in ("correct", "wrong"):
                got.append(1.0 if j.outcome == "correct" else 0.0)
    return [sum(v) / len(v) if v else None for _, v in sorted(by_pair.items())]


def causal_score(judgements: Sequence[Judgement], *, alpha: float = 0.05) -> CausalResult:
    """Accuracy of the judge over decided pairs (mean credit, see `pair_credits`), with its interval and the
    p-value against chance; `counts` counts showings.

    ok when some pair was decided; failed when every showing's call failed; undefined otherwise (no pair shown,
    or only ties and unparsable answers)."""
    counts = {o: 0 for o in ("correct", "wrong", "tie", "unparsable", "failed", "same")}
    for j in judgements:
        counts[j.outcome] += 1
    credits = pair_credits(judgements)
    res = choice_accuracy(credits, alpha=alpha)
    n_shown = len(judgements) - counts["same"]
    if res.value is not None:
        whole = [c for c in credits if c is not None and c != 0.5]  # a split pair is a tie for the exact test
        return CausalResult("ok", res, binomial_p_value(int(sum(whole)), len(whole), CHANCE), counts)
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


@dataclass(frozen=True)
class Evidence:
    """The correlational score a verdict rests on."""

    method: str
    value: float
    score_id: int | None = None


def best_correlational(scores: Sequence[Any]) -> Evidence | None:
    """The best defined score of the first evidence tier that has one (autointerp.methods: simulation, else detection
    or fuzzing); None when no method a verdict may rest on has a defined score."""
    tiers: dict[int, list[Any]] = {}
    for s in scores:
        m = methods.METHODS.get(s.method)
        if m is not None and m.evidence is not None and s.value is not None and s.status == "ok":
            tiers.setdefault(m.evidence, []).append(s)
    if not tiers:
        return None
    best = max(tiers[min(tiers)], key=lambda s: s.value)
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
        need = th.min_simulation if methods.get(corr.method).kind == "correlation" else th.min_classification
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
