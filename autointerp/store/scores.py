"""Reads of the score table, joined with the explanation each score belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from autointerp.store.engine import Store
from autointerp.store.tables import Explanation, Score


@dataclass(frozen=True)
class ScoreView:
    method: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    n_failed: int
    status: str
    reason: str | None
    explanation: str | None
    explanation_id: int
    explainer: str
    model: str
    prompt_hash: str
    details: dict[str, Any]


def scores_for(store: Store, feature_id: int) -> list[ScoreView]:
    with store.session() as s:
        rows = s.exec(
            select(Score, Explanation)
            .join(Explanation, col(Explanation.id) == col(Score.explanation_id))
            .where(Score.feature_id == feature_id)
            .order_by(col(Score.explanation_id), col(Score.method))
        ).all()
    return [
        ScoreView(
            method=sc.method,
            value=sc.value,
            ci_low=sc.ci_low,
            ci_high=sc.ci_high,
            n=sc.n,
            n_failed=sc.n_failed,
            status=sc.status,
            reason=sc.reason,
            explanation=ex.text,
            explanation_id=sc.explanation_id,
            explainer=ex.explainer,
            model=sc.model,
            prompt_hash=sc.prompt_hash,
            details=dict(sc.details or {}),
        )
        for sc, ex in rows
    ]
