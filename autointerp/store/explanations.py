"""Explanation rows: idempotent writes keyed by (feature, explainer, model, prompt hash, config hash), and reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlmodel import col, select

from autointerp.store.dialect import among
from autointerp.store.engine import Store
from autointerp.store.tables import Explanation
from autointerp.store.upsert import finished, upsert


def done_feature_ids(store: Store, ident: dict[str, str]) -> set[int]:
    """Features that already have a final row (ok or skipped) for this explainer identity; failures are retried."""
    match = {k: ident[k] for k in ("explainer", "model", "prompt_hash", "config_hash")}
    return finished(store, Explanation, "feature_id", match, ("ok", "skipped"))


EXPLANATION_KEY = ("feature_id", "explainer", "model", "prompt_hash", "config_hash")
_FIELDS = ("status", "text", "error", "raw", "n_records", "prompt_tokens", "run_id", "config")


def write_explanations(store: Store, rows: Sequence[Explanation]) -> None:
    """Insert, or update the row with the same key (a retried failure); final rows (ok, skipped) are kept."""
    if rows:
        upsert(store, rows, EXPLANATION_KEY, _FIELDS, keep=_final, add=("attempts",))


def _final(stored: Explanation, _new: Explanation) -> bool:
    return stored.status in ("ok", "skipped")


@dataclass(frozen=True)
class ExplanationView:
    id: int
    text: str | None
    explainer: str
    model: str
    prompt: str
    prompt_hash: str
    config_hash: str
    status: str
    error: str | None
    raw: str | None
    attempts: int
    created_at: str


def explanations_for(store: Store, feature_ids: Sequence[int]) -> dict[int, list[ExplanationView]]:
    out: dict[int, list[ExplanationView]] = {fid: [] for fid in feature_ids}
    if not feature_ids:
        return out
    with store.session() as s:
        rows = s.exec(
            select(Explanation)
            .where(among(store, col(Explanation.feature_id), feature_ids))
            .order_by(col(Explanation.created_at).desc(), col(Explanation.id).desc())
        ).all()
    for r in rows:
        out[r.feature_id].append(_view(r))
    return out


def ok_explanations(store: Store, feature_ids: Sequence[int]) -> list[Explanation]:
    """The ok explanations of the features, by feature then row id."""
    with store.session() as s:
        return list(
            s.exec(
                select(Explanation)
                .where(among(store, col(Explanation.feature_id), feature_ids), Explanation.status == "ok")
                .order_by(col(Explanation.feature_id), col(Explanation.id))
            ).all()
        )


def feature_key_of(store: Store, explanation_id: int) -> str | None:
    """The id (MODEL/SITE/SOURCE/INDEX) of the feature an explanation explains (None: no such explanation)."""
    from autointerp.store.tables import Feature

    with store.session() as s:
        q = select(Feature.key).join(Explanation, col(Explanation.feature_id) == col(Feature.id))
        return s.exec(q.where(Explanation.id == explanation_id)).first()


def _view(r: Explanation) -> ExplanationView:
    assert r.id is not None
    return ExplanationView(
        id=r.id,
        text=r.text,
        explainer=r.explainer,
        model=r.model,
        prompt=r.prompt,
        prompt_hash=r.prompt_hash,
        config_hash=r.config_hash,
        status=r.status,
        error=r.error,
        raw=r.raw,
        attempts=r.attempts,
        created_at=r.created_at.isoformat(),
    )
