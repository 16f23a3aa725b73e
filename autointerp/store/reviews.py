"""Human review: decisions on explanations (the `review` table), the review queue's orders, and the rows the
agreement figures are computed from. No torch, no web framework: the review page and the tests call these."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlmodel import col, select

from autointerp import methods
from autointerp.store.engine import Store
from autointerp.store.search import QueryError
from autointerp.store.tables import Explanation, Review, Score

DECISIONS = ("accept", "reject", "edit", "flag")
QueueOrder = Literal["lowest", "uncertain", "random"]
ORDERS: tuple[QueueOrder, ...] = ("lowest", "uncertain", "random")
HUMAN = "human"  # the explainer name of a reviewer's edited explanation
# What a decision says of the machine's explanation, for the agreement figures: an edit means it was not right as
# written; a flag says nothing of it (it asks for another look).
ACCEPTED = {"accept": True, "reject": False, "edit": False}


@dataclass(frozen=True)
class ReviewView:
    id: int
    explanation_id: int
    feature_id: int
    reviewer: str
    decision: str
    text: str | None
    note: str | None
    human_explanation_id: int | None
    created_at: str


def _view(r: Review) -> ReviewView:
    assert r.id is not None
    return ReviewView(r.id, r.explanation_id, r.feature_id, r.reviewer, r.decision, r.text, r.note,
                      r.human_explanation_id, r.created_at.isoformat())  # fmt: skip


def check_reviewer(reviewer: str) -> str:
    """A reviewer's name, stripped: 1 to 64 printable characters (no control character or lone surrogate, which
    a database column refuses or a page cannot show); QueryError naming it otherwise."""
    name = reviewer.strip()
    if not name or len(name) > 64:
        raise QueryError(f"reviewer name {reviewer!r}: give 1 to 64 characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise QueryError(f"reviewer name {reviewer!r}: give printable characters (no control characters)")
    return name


def decide(
    store: Store, explanation_id: int, reviewer: str, decision: str, text: str | None = None, note: str | None = None
) -> ReviewView:
    """Record `reviewer`'s decision on an explanation. An edit saves `text` as a human explanation of the same
    feature (explainer "human", model "human:REVIEWER", linked to the machine's in its config), which is scored like
    any other; the same edit twice makes one explanation. The machine's row is never changed."""
    reviewer = check_reviewer(reviewer)
    if decision not in DECISIONS:
        raise QueryError(f"unknown decision {decision!r}: choose {', '.join(DECISIONS)}")
    text = (text or "").strip() or None
    if decision == "edit" and text is None:
        raise QueryError("an edit needs the new explanation's text")
    with store.session() as s:
        e = s.get(Explanation, explanation_id)
        if e is None or e.status != "ok":
            raise QueryError(f"no ok explanation {explanation_id} to review")
        human_id = None
        if decision == "edit":
            assert text is not None
            digest = hashlib.sha256(f"{explanation_id}\0{text}".encode()).hexdigest()[:16]
            found = s.exec(
                select(Explanation).where(
                    Explanation.feature_id == e.feature_id, Explanation.explainer == HUMAN,
                    Explanation.model == f"{HUMAN}:{reviewer}", Explanation.config_hash == digest,
                )
            ).first()  # fmt: skip
            if found is None:
                found = Explanation(feature_id=e.feature_id, explainer=HUMAN, model=f"{HUMAN}:{reviewer}", prompt="",
                                    prompt_hash="", config_hash=digest, status="ok", text=text,
                                    config={"edited_from": explanation_id, "reviewer": reviewer})  # fmt: skip
                s.add(found)
                s.flush()
            human_id = found.id
        row = Review(explanation_id=explanation_id, feature_id=e.feature_id, reviewer=reviewer, decision=decision,
                     text=text if decision == "edit" else None, note=(note or "").strip() or None,
                     human_explanation_id=human_id)  # fmt: skip
        s.add(row)
        s.commit()
        s.refresh(row)
        return _view(row)


def undo_last(store: Store, reviewer: str) -> ReviewView | None:
    """Remove `reviewer`'s latest decision (None when there is none). An edit's human explanation goes with it
    unless something else rests on it (a score or another review)."""
    with store.session() as s:
        row = s.exec(select(Review).where(Review.reviewer == reviewer).order_by(col(Review.id).desc()).limit(1)).first()
        if row is None:
            return None
        out = _view(row)
        hid = row.human_explanation_id
        s.delete(row)
        s.flush()
        if hid is not None:
            used = s.exec(select(Score.id).where(Score.explanation_id == hid).limit(1)).first() is not None
            used = used or s.exec(
                select(Review.id).where((col(Review.human_explanation_id) == hid) | (Review.explanation_id == hid))
            ).first() is not None  # fmt: skip
            if not used:
                human = s.get(Explanation, hid)
                if human is not None:
                    s.delete(human)
        s.commit()
        return out


def reviews_for(store: Store, feature_id: int) -> list[ReviewView]:
    with store.session() as s:
        rows = s.exec(select(Review).where(Review.feature_id == feature_id).order_by(col(Review.id))).all()
    return [_view(r) for r in rows]


def reviewed_by(store: Store, reviewer: str) -> set[int]:
    """The explanations `reviewer` has decided on."""
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT DISTINCT explanation_id FROM review WHERE reviewer = :r"), {"r": reviewer})
        return {int(r[0]) for r in rows}


def queue_stamp(store: Store) -> tuple[Any, ...]:
    """Changes whenever a feature, an explanation or a score is added (the queue's order and the list's filter
    choices are then computed again); reads three primary-key maxima, O(1). Decisions made through the review page
    also bump its own counter (undo can delete an edit's explanation, which a maximum may not show)."""
    with store.engine.connect() as conn:
        return tuple(
            conn.exec_driver_sql(f"SELECT max(id) FROM {table}").scalar()
            for table in ("feature", "explanation", "score")
        )


def explanations_after(store: Store, after: int) -> list[int]:
    """Ok explanations with an id above `after`, by id."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id FROM explanation WHERE id > :a AND status = 'ok' AND text IS NOT NULL ORDER BY id"),
            {"a": after},
        )
        return [int(r[0]) for r in rows]


def queue_order(store: Store, order: QueueOrder, method: str = methods.DEFAULT, seed: int = 0) -> list[int]:
    """Every ok explanation, in the order the queue offers them.

    - lowest: best `method` score first lowest (explanations without one last, by id);
    - uncertain: most uncertain first: the widest 95 % interval of any of its ok scores, or the spread between its
      non-causal methods' best scores (autointerp.methods.non_causal) when that is wider (scorers disagreeing);
    - random: a sample seeded by `seed` (audits: the same seed gives the same order)."""
    if order not in ORDERS:
        raise QueryError(f"unknown queue order {order!r}: choose {', '.join(ORDERS)}")
    with store.engine.connect() as conn:
        ids = [int(r[0]) for r in conn.exec_driver_sql(
            "SELECT id FROM explanation WHERE status = 'ok' AND text IS NOT NULL ORDER BY id")]  # fmt: skip
        if order == "random":
            return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
        rows = conn.exec_driver_sql(
            "SELECT explanation_id, method, value, ci_low, ci_high FROM score WHERE status = 'ok' AND value IS NOT NULL"
        ).all()
    if order == "lowest":
        best: dict[int, float] = {}
        for eid, m, v, _lo, _hi in rows:
            if m == method and v > best.get(eid, float("-inf")):
                best[eid] = float(v)
        scored = sorted(best, key=lambda i: (best[i], i))
        rest = [i for i in ids if i not in best]
        valid = set(ids)
        return [i for i in scored if i in valid] + rest
    width: dict[int, float] = {}
    per_method: dict[int, dict[str, float]] = {}
    compared = set(methods.non_causal())
    for eid, m, v, lo, hi in rows:
        if lo is not None and hi is not None:
            width[eid] = max(width.get(eid, 0.0), float(hi) - float(lo))
        if m in compared:
            d = per_method.setdefault(eid, {})
            d[m] = max(d.get(m, float("-inf")), float(v))
    for eid, d in per_method.items():
        if len(d) > 1:
            width[eid] = max(width.get(eid, 0.0), max(d.values()) - min(d.values()))
    return sorted(ids, key=lambda i: (-width.get(i, -1.0), i))


@dataclass(frozen=True)
class Decision:
    """A reviewer's latest decision on a machine explanation, with what the agreement figures compare it with."""

    explanation_id: int
    feature_id: int
    source: str  # neurons or an SAE id
    reviewer: str
    decision: str
    scores: dict[str, float]  # the explanation's best score by each method


def latest_decisions(store: Store) -> list[Decision]:
    """Each reviewer's latest decision on each explanation that is not a human one."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT r.explanation_id, r.feature_id, f.source, r.reviewer, r.decision FROM review r "
            "JOIN feature f ON f.id = r.feature_id JOIN explanation e ON e.id = r.explanation_id "
            "WHERE e.explainer <> 'human' AND NOT EXISTS (SELECT 1 FROM review q WHERE q.reviewer = r.reviewer "
            "AND q.explanation_id = r.explanation_id AND q.id > r.id) ORDER BY r.id"
        ).all()
        ids = sorted({int(r[0]) for r in rows})
        scores: dict[int, dict[str, float]] = {}
        for k in range(0, len(ids), 500):
            chunk = ids[k : k + 500]
            marks = ", ".join(str(i) for i in chunk)  # ints from the database: safe to inline
            for eid, m, v in conn.exec_driver_sql(
                f"SELECT explanation_id, method, max(value) FROM score WHERE explanation_id IN ({marks}) "
                "AND value IS NOT NULL GROUP BY explanation_id, method"
            ):
                scores.setdefault(int(eid), {})[m] = float(v)
    return [Decision(int(e), int(f), src, who, d, scores.get(int(e), {})) for e, f, src, who, d in rows]


def decisions_by_reviewer(decisions: Sequence[Decision]) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for d in decisions:
        out.setdefault(d.reviewer, {})[d.explanation_id] = d.decision
    return out
