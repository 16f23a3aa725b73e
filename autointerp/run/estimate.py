"""`autointerp run --dry-run`: per stage, the pending units and what they will cost, from the requests the stages
would really send for a sample of them, the prices in the config, and past usage where there is some.

The sample's requests are built by each stage's own code (Stage.sample_requests) with a recording client that sends
nothing (so the prompt tokens are those of the real rendered prompts; features not explained yet get a typical
explanation): this module knows no stage.
Prompt tokens are counted as the backend counts them: the local model's tokenizer (over the messages' text; the
chat template adds a few per message), the fake backend's words, else characters / 4. The
completion tokens are the past average per call of that stage and model where the database has usage, else the
requests' max_tokens (an upper bound). Time comes from the throughput of past runs of the stage, where measured.
Nothing is written.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from autointerp.config import LLMConfig, RunConfig
from autointerp.llm.types import Capabilities, ChatRequest, Failure, LogprobsRequest
from autointerp.store.engine import Store

SAMPLE = 5  # units rendered per part


@dataclass(frozen=True)
class PartEstimate:
    part: str
    llm: str
    pending: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    seconds: float | None  # None: no throughput measured yet
    completion_from: str  # "past usage" or "max_tokens"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecordingClient:
    """Looks like an LLMClient to the stages; records the requests and sends none (every answer is a Failure)."""

    def __init__(self, name: str, logprobs: bool) -> None:
        self.name = name
        self._caps = Capabilities(chat=True, prompt_logprobs=logprobs, note="dry run: nothing is sent")
        self.requests: list[ChatRequest | LogprobsRequest] = []
        self.calls = self.cache_hits = self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0

    def capabilities(self) -> Capabilities:
        return self._caps

    def _record(self, reqs: Sequence[Any]) -> list[Any]:
        self.requests += list(reqs)
        return [Failure(error="dry run", kind="DryRun", attempts=0) for _ in reqs]

    def chat_many(self, reqs: Sequence[ChatRequest]) -> list[Any]:
        return self._record(reqs)

    def logprobs_many(self, reqs: Sequence[LogprobsRequest]) -> list[Any]:
        return self._record(reqs)

    async def chat_many_async(self, reqs: Sequence[ChatRequest]) -> list[Any]:  # pragma: no cover (unused)
        await asyncio.sleep(0)
        return self._record(reqs)


def _counter(c: LLMConfig) -> Callable[[str], int]:
    """How the backend counts prompt tokens: the local model's tokenizer; the fake's words; else characters / 4."""
    if c.backend == "fake":
        return lambda text: len(text.split())
    if c.backend == "local":
        try:
            from autointerp.subject.files import materialize, resolve
            from autointerp.subject.tokens import FastTokenizer

            path = materialize(resolve(c.model)) / "tokenizer.json"
            if path.is_file():
                tok = FastTokenizer(path)
                return tok.count
        except Exception:  # noqa: BLE001 (a model not converted yet: fall back to the character rule)
            pass
    return lambda text: max(1, len(text) // 4)


def _tokens(req: Any, count: Callable[[str], int]) -> tuple[int, int]:
    """(prompt tokens, completion token cap) of a request."""
    if isinstance(req, LogprobsRequest):
        return count(req.prefix + req.prompt), 0
    return sum(count(m.content) for m in req.messages), req.max_tokens


def estimate(cfg: RunConfig, store: Store, stages: Sequence[str], selector: str | None = None) -> list[PartEstimate]:
    from autointerp.jobs.loop import build_parts
    from autointerp.store.llm_log import usage_summary
    from autointerp.store.queries import select_features
    from autointerp.store.runs import throughput

    features = select_features(store, selector or cfg.run.features or cfg.explain.features, limit=cfg.explain.limit,
                               seed=cfg.explain.seed)  # fmt: skip
    past = {(r.stage, r.model): r for r in usage_summary(store)}
    rate = throughput(store)
    out: list[PartEstimate] = []
    upstream: set[int] = set()
    for part in build_parts(cfg, store, stages):
        pending_ids = part.pending(features) | upstream
        upstream = pending_ids
        pending = [f for f in features if f.id in pending_ids]
        c = cfg.llm_config(part.llm) if part.llm else None
        rec = RecordingClient(f"{c.backend}:{c.model}" if c else "", logprobs=bool(c and c.backend != "openai"))
        sample = random.Random(0).sample(pending, min(SAMPLE, len(pending))) if pending else []
        if c is not None and sample:
            part.sample_requests(sample, rec)
        count = _counter(c) if c else (lambda _text: 0)
        sizes = [_tokens(r, count) for r in rec.requests]
        per_unit_calls = len(sizes) / len(sample) if sample else 0.0
        prompt = sum(p for p, _ in sizes) / len(sample) if sample else 0.0
        hist = past.get((part.name, c.model)) if c else None
        if hist is not None and hist.calls:
            completion, source = hist.completion_tokens / hist.calls * per_unit_calls, "past usage"
        else:
            completion, source = sum(m for _, m in sizes) / len(sample) if sample else 0.0, "max_tokens"
        n = len(pending)
        cost = (c.price_prompt * prompt + c.price_completion * completion) * n / 1e6 if c else 0.0
        per_s = rate.get(part.name)
        out.append(PartEstimate(part.label, part.llm or "", n, round(per_unit_calls * n), round(prompt * n),
                                round(completion * n), round(cost, 4), None if not per_s else round(n / per_s, 1),
                                source))  # fmt: skip
    return out
