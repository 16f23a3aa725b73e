"""The LLM client's response cache and usage log, kept in the database (the client only sees two small objects)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from autointerp.store.engine import Store
from autointerp.store.tables import LLMCacheEntry, LLMCall


class SqlResponseCache:
    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, key: str) -> dict[str, Any] | None:
        with self.store.session() as s:
            row = s.get(LLMCacheEntry, key)
            return None if row is None else dict(row.response)

    def put(self, key: str, backend: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        with self.store.session() as s:
            s.add(LLMCacheEntry(key=key, backend=backend, model=model, request=request, response=response))
            try:
                s.commit()
            except IntegrityError:  # another worker cached the same request first: same answer, keep theirs
                s.rollback()


class SqlUsageLog:
    def __init__(self, store: Store, stage: str = "") -> None:
        self.store = store
        self.stage = stage

    def record(self, usage: Any) -> None:
        with self.store.session() as s:
            s.add(LLMCall(stage=self.stage, **asdict(usage)))
            s.commit()


@dataclass(frozen=True)
class UsageRow:
    backend: str
    model: str
    stage: str
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    mean_latency_s: float


def usage_summary(store: Store) -> list[UsageRow]:
    """Calls, tokens and cost grouped by backend, model and stage."""
    q = (
        select(
            col(LLMCall.backend),
            col(LLMCall.model),
            col(LLMCall.stage),
            func.count(),
            func.sum(case((col(LLMCall.status) == "error", 1), else_=0)),  # portable (PostgreSQL has no sum(bool))
            func.sum(col(LLMCall.prompt_tokens)),
            func.sum(col(LLMCall.completion_tokens)),
            func.sum(col(LLMCall.cost_usd)),
            func.avg(col(LLMCall.latency_s)),
        )
        .group_by(col(LLMCall.backend), col(LLMCall.model), col(LLMCall.stage))
        .order_by(col(LLMCall.backend), col(LLMCall.model), col(LLMCall.stage))
    )
    with store.session() as s:
        rows = s.execute(q).all()
    return [
        UsageRow(b, m, st, int(n), int(e or 0), int(p or 0), int(c or 0), float(cost or 0.0), float(lat or 0.0))
        for b, m, st, n, e, p, c, cost, lat in rows
    ]
