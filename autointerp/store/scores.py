"""Reads of the score table, joined with the explanation each score belongs to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from autointerp.store.dialect import among
from autointerp.store.engine import Store
from autointerp.store.tables import Explanation, Score
from autointerp.store.upsert import finished, upsert

SCORE_KEY = ("explanation_id", "method", "model", "prompt_hash", "config_hash")
_FIELDS = (
    "feature_id", "prompt", "config", "status", "value", "ci_low", "ci_high", "n", "n_failed", "reason", "details",
    "run_id",
)  # fmt: skip


def write_scores(store: Store, rows: list[Score]) -> list[Score]:
    """Insert, or update the row with the same (explanation, method, model, prompt hash, config hash)."""
    return upsert(store, rows, SCORE_KEY, _FIELDS) if rows else []


def scored_explanation_ids(store: Store, key: dict[str, str], explanation_ids: list[int]) -> set[int]:
    """Explanations that already have a final score (ok or undefined) for this scorer identity; failed ones are
    scored again."""
    match = {k: key[k] for k in ("method", "model", "prompt_hash", "config_hash")}
    return finished(store, Score, "explanation_id", match, ("ok", "undefined"), within=explanation_ids)


def scored_by_identity(store: Store, keys: Sequence[dict[str, str]], explanation_ids: list[int]) -> list[set[int]]:
    """scored_explanation_ids for several scorer identities in one query (the job runner asks before each chunk)."""
    if not keys or not explanation_ids:
        return [set() for _ in keys]
    import sqlalchemy as sa

    t = Score.__table__  # type: ignore[attr-defined]
    q = sa.select(t.c.explanation_id, t.c.method, t.c.model, t.c.prompt_hash, t.c.config_hash).where(
        t.c.status.in_(["ok", "undefined"]), among(store, t.c.explanation_id, explanation_ids)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    have: dict[tuple[str, str, str, str], set[int]] = {}
    for eid, *ident in rows:
        have.setdefault(tuple(ident), set()).add(int(eid))
    return [set(have.get((k["method"], k["model"], k["prompt_hash"], k["config_hash"]), set())) for k in keys]


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


def simulated_by_context(scores: Sequence[ScoreView]) -> dict[int, list[float]]:
    """Context index -> the simulator's predicted activations (0-10), from the feature's best simulation score:
    what `features show` and the review page show beside a test record's real activations."""
    sims = [sc for sc in scores if sc.method == "simulation" and sc.value is not None]
    if not sims:
        return {}
    best = max(sims, key=lambda sc: sc.value or 0.0)
    return {int(r["context"]): [float(x) for x in r["predicted"]] for r in best.details.get("records", [])}
