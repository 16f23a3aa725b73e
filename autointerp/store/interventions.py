"""Rows of the `intervene` stage: interventions (strength, KL, direct effects, continuations), intervention scores
(rows of the `score` table with method "intervention") and verdicts. Idempotent upserts on natural keys, and reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from autointerp import methods
from autointerp.store.dialect import among
from autointerp.store.engine import Store
from autointerp.store.scores import write_scores
from autointerp.store.tables import Explanation, InterventionRow, Score, Verdict
from autointerp.store.upsert import upsert

METHOD = "intervention"
VERDICTS = ("verified", "unverified", "contradicted")


# ---------------------------------------------------------------------------------------------- interventions


def interventions_of(store: Store, feature_ids: Sequence[int], config_hash: str) -> dict[int, InterventionRow]:
    """The intervention rows of the features for one config hash, by feature id (one query)."""
    if not feature_ids:
        return {}
    with store.session() as s:
        rows = s.exec(
            select(InterventionRow).where(
                among(store, col(InterventionRow.feature_id), feature_ids), InterventionRow.config_hash == config_hash
            )
        ).all()
    return {r.feature_id: r for r in rows}


_IV_KEY = ("feature_id", "config_hash")
_IV_FIELDS = (
    "mode", "config", "status", "strength", "target_kl", "kl", "converged", "start", "promoted", "suppressed",
    "samples", "act_baseline", "act_steered", "act_increase", "n_forward", "n_generated", "seconds", "error", "run_id",
)  # fmt: skip


def write_intervention(store: Store, row: InterventionRow) -> InterventionRow:
    """Insert, or replace the failed row with the same (feature, config hash); an ok row already there wins (a
    concurrent worker finished first). Returns the stored row."""
    return upsert(store, [row], _IV_KEY, _IV_FIELDS, keep=lambda found, _new: found.status == "ok")[0]


# ---------------------------------------------------------------------------------------------- scores


def final_scores(
    store: Store, explanation_ids: Sequence[int], *, model: str, prompt_hash: str, config_hash: str
) -> dict[int, Score]:
    """Intervention scores that need no more work: status ok or undefined, with no failed judge call. Failed rows
    and rows with failed calls are redone on a rerun (the response cache makes the answered calls free)."""
    if not explanation_ids:
        return {}
    with store.session() as s:
        rows = s.exec(
            select(Score).where(
                among(store, col(Score.explanation_id), explanation_ids),
                Score.method == METHOD,
                Score.model == model,
                Score.prompt_hash == prompt_hash,
                Score.config_hash == config_hash,
            )
        ).all()
    return {r.explanation_id: r for r in rows if r.status in ("ok", "undefined") and r.n_failed == 0}


def write_score(store: Store, row: Score) -> Score:
    """Insert, or update the row with the same (explanation, method, model, prompt hash, config hash)."""
    return write_scores(store, [row])[0]


def correlational_scores(store: Store, explanation_ids: Sequence[int]) -> dict[int, list[Score]]:
    """Defined scores of each explanation by the methods a verdict may rest on (autointerp.methods.evidence)."""
    out: dict[int, list[Score]] = {i: [] for i in explanation_ids}
    if not explanation_ids:
        return out
    with store.session() as s:
        rows = s.exec(
            select(Score).where(
                among(store, col(Score.explanation_id), explanation_ids),
                col(Score.method).in_(methods.evidence()),
                Score.status == "ok",
                col(Score.value).is_not(None),
            )
        ).all()
    for r in rows:
        out[r.explanation_id].append(r)
    return out


# ---------------------------------------------------------------------------------------------- verdicts


_VERDICT_KEY = ("explanation_id", "config_hash")
_VERDICT_FIELDS = (
    "feature_id", "verdict", "reason", "causal_score_id", "causal_value", "causal_ci_low", "causal_ci_high",
    "act_increase", "correlational_score_id", "correlational_method", "correlational_value", "config", "run_id",
)  # fmt: skip


def write_verdict(store: Store, row: Verdict) -> Verdict:
    """Insert, or update the verdict with the same (explanation, config hash): a verdict follows its evidence. The
    same verdict again leaves the stored row as it is (its time is when the evidence last changed)."""

    def same(found: Verdict, new: Verdict) -> bool:
        return all(getattr(found, n) == getattr(new, n) for n in _VERDICT_FIELDS)

    return upsert(store, [row], _VERDICT_KEY, _VERDICT_FIELDS, keep=same)[0]


# ---------------------------------------------------------------------------------------------- reads for display


@dataclass(frozen=True)
class InterventionView:
    mode: str
    strength: float | None
    target_kl: float
    kl: float | None
    converged: bool
    promoted: list[dict[str, Any]]
    suppressed: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    act_baseline: float | None
    act_steered: float | None
    act_increase: float | None
    n_forward: int
    n_generated: int
    config_hash: str
    created_at: str


@dataclass(frozen=True)
class VerdictView:
    explanation_id: int
    explanation: str | None
    explainer: str
    verdict: str
    reason: str
    judge: str | None
    causal_value: float | None
    causal_ci_low: float | None
    causal_ci_high: float | None
    causal_n: int
    act_increase: float | None
    correlational_method: str | None
    correlational_value: float | None
    created_at: str


def latest_intervention(store: Store, feature_id: int) -> InterventionView | None:
    """The most recent ok intervention of a feature (None when it has none)."""
    with store.session() as s:
        r = s.exec(
            select(InterventionRow)
            .where(InterventionRow.feature_id == feature_id, InterventionRow.status == "ok")
            .order_by(col(InterventionRow.created_at).desc(), col(InterventionRow.id).desc())
        ).first()
    if r is None:
        return None
    return InterventionView(
        mode=r.mode,
        strength=r.strength,
        target_kl=r.target_kl,
        kl=r.kl,
        converged=r.converged,
        promoted=list(r.promoted),
        suppressed=list(r.suppressed),
        samples=list(r.samples),
        act_baseline=r.act_baseline,
        act_steered=r.act_steered,
        act_increase=r.act_increase,
        n_forward=r.n_forward,
        n_generated=r.n_generated,
        config_hash=r.config_hash,
        created_at=r.created_at.isoformat(),
    )


def _verdict_rows(s: Session, feature_id: int) -> list[tuple[Verdict, Explanation, Score | None]]:
    rows = s.exec(
        select(Verdict, Explanation)
        .join(Explanation, col(Explanation.id) == col(Verdict.explanation_id))
        .where(Verdict.feature_id == feature_id)
        .order_by(col(Verdict.created_at).desc(), col(Verdict.id).desc())
    ).all()
    out = []
    for v, e in rows:
        score = s.get(Score, v.causal_score_id) if v.causal_score_id is not None else None
        out.append((v, e, score))
    return out


def verdicts_for(store: Store, feature_id: int) -> list[VerdictView]:
    """The latest verdict of each explanation of a feature, newest first."""
    with store.session() as s:
        rows = _verdict_rows(s, feature_id)
    seen: set[int] = set()
    out = []
    for v, e, score in rows:
        if v.explanation_id in seen:
            continue
        seen.add(v.explanation_id)
        out.append(
            VerdictView(
                explanation_id=v.explanation_id,
                explanation=e.text,
                explainer=e.explainer,
                verdict=v.verdict,
                reason=v.reason,
                judge=score.model if score is not None else None,
                causal_value=v.causal_value,
                causal_ci_low=v.causal_ci_low,
                causal_ci_high=v.causal_ci_high,
                causal_n=score.n if score is not None else 0,
                act_increase=v.act_increase,
                correlational_method=v.correlational_method,
                correlational_value=v.correlational_value,
                created_at=v.created_at.isoformat(),
            )
        )
    return out


def headline_verdict(verdicts: Sequence[VerdictView]) -> VerdictView | None:
    """The feature's verdict: its best explanation's (verified before unverified before contradicted; newest
    first among equals)."""
    if not verdicts:
        return None
    rank = {v: i for i, v in enumerate(VERDICTS)}
    return min(verdicts, key=lambda v: rank.get(v.verdict, len(rank)))
