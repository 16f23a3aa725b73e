"""The LLM client's response cache and usage log, kept in the database (the client only sees two small objects)."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlmodel import col

from autointerp.store.engine import Store
from autointerp.store.tables import LLMCacheEntry, LLMCall, Run
from autointerp.store.upsert import insert_missing

# The one key of a compressed JSON value: zlib over its UTF-8 JSON, then base85 (JSON columns hold text only).
PACKED = "zlib85"


def pack(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON value as a one-key object holding it compressed (a simulator response shrinks about 3x)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    # surrogatepass: a lone surrogate in a model's answer is kept as it was, not a crash (as in the request key)
    return {PACKED: base64.b85encode(zlib.compress(text.encode("utf-8", "surrogatepass"), 9)).decode("ascii")}


def unpack(value: dict[str, Any]) -> dict[str, Any]:
    """The value `pack` compressed; a value stored uncompressed (before compression existed) as it is."""
    if set(value) != {PACKED}:
        return dict(value)
    out: dict[str, Any] = json.loads(zlib.decompress(base64.b85decode(value[PACKED])).decode("utf-8", "surrogatepass"))
    return out


class SqlResponseCache:
    """The response cache of the LLM client in table llm_cache: request and response stored compressed (`pack`);
    entries written uncompressed by earlier versions read as they are."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, key: str) -> dict[str, Any] | None:
        with self.store.session() as s:
            row = s.get(LLMCacheEntry, key)
            return None if row is None else unpack(row.response)

    def put(self, key: str, backend: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        # another worker that cached the same request first gave the same answer: theirs is kept
        row = LLMCacheEntry(key=key, backend=backend, model=model, request=pack(request), response=pack(response))
        insert_missing(self.store, [row], ("key",))


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


SPEND = "llm_spend"  # the key of a job's run counts that holds the LLM spend of its finished chunks


def job_spend(store: Store, job: str, stages: Sequence[str]) -> dict[str, float]:
    """The LLM spend of job `job` so far, over every worker and every invocation: the sum of `counts[SPEND]`
    ({calls, tokens, usd}) of the runs of `stages` whose config names the job (each worker records its part's spend
    there after every chunk; LLM calls themselves, in llm_call, carry no job)."""
    total = {"calls": 0.0, "tokens": 0.0, "usd": 0.0}
    with store.session() as s:
        rows = s.execute(select(col(Run.config), col(Run.counts)).where(col(Run.stage).in_(list(stages)))).all()
    for config, counts in rows:
        if (config or {}).get("job") == job and isinstance((counts or {}).get(SPEND), dict):
            for k in total:
                total[k] += float(counts[SPEND].get(k, 0))
    return total
