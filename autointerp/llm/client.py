"""The one LLM client every stage uses: response cache, retries of transient failures, bounded concurrency, usage.

Order of work for each request: the cache (a hit costs no call), then the backend under a semaphore, retried with
exponential backoff by tenacity while the error is transient. The cache and usage log are objects handed in (the
store provides SQL ones), so this module knows nothing of the database.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from autointerp.config import LLMConfig
from autointerp.llm.base import Backend, BackendSpec
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    Failure,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    RetriesExhausted,
    Usage,
    request_key,
)


class ResponseCache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, backend: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None: ...


class UsageLog(Protocol):
    def record(self, usage: Usage) -> None: ...


class MemoryCache:
    """A dict-backed cache (tests, one-off scripts)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, backend: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None:  # noqa: ARG002
        self.data[key] = response


class MemoryUsage:
    def __init__(self) -> None:
        self.rows: list[Usage] = []

    def record(self, usage: Usage) -> None:
        self.rows.append(usage)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_s: float = 1.0
    max_s: float = 30.0


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


def _chat_from(d: dict[str, Any]) -> ChatResult:
    return ChatResult(**d)


def _chat_to(res: ChatResult) -> dict[str, Any]:
    d = asdict(res)
    del d["endpoint"]  # where it came from is stored beside the request, not in the answer
    return d


def _logprobs_to(res: LogprobsResult) -> dict[str, Any]:
    """The cached form of a logprobs result, small once compressed: offsets as steps from the previous one, the
    filled rows only, each as [index, keys], and the values of all rows in one string of decimals. Backends that
    compute in float32 (local, vLLM) give values that float32 holds exactly; those are written in float32's
    shortest form (at most 9 digits, not the 17 of their float64 repr) and read back as float32, so a rerun gets
    the same floats bit for bit; any other value keeps its float64 repr."""
    import numpy as np

    rows = [[i, list(row)] for i, row in enumerate(res.logprobs) if row]
    values = [v for row in res.logprobs for v in row.values()]
    text, f32 = " ".join(map(str, np.asarray(values, dtype=np.float32))), True
    if _unpack(text, f32) != values:  # not all float32 values: the exact float64 reprs
        text, f32 = " ".join(map(repr, values)), False
    steps = [b - a for a, b in zip((0, *res.offsets), res.offsets, strict=False)]
    return {"tokens": list(res.tokens), "steps": steps, "prompt_tokens": res.prompt_tokens, "n": len(res.logprobs),
            "rows": rows, "values": text, "f32": f32}  # fmt: skip


def _unpack(text: str, f32: bool) -> list[float]:
    import numpy as np

    if not text:
        return []
    return [float(x) for x in text.split()] if not f32 else np.array(text.split(), np.float32).tolist()


def _logprobs_from(d: dict[str, Any]) -> LogprobsResult:
    if "rows" not in d:  # written before the compact form: every row in full
        return LogprobsResult(
            tokens=tuple(d["tokens"]),
            offsets=tuple(d["offsets"]),
            logprobs=tuple(dict(x) for x in d["logprobs"]),
            prompt_tokens=int(d.get("prompt_tokens", 0)),
        )
    values = iter(_unpack(d["values"], bool(d["f32"])))
    rows: list[dict[str, float]] = [{} for _ in range(int(d["n"]))]
    for i, keys in d["rows"]:
        rows[i] = {k: next(values) for k in keys}
    offsets = tuple(itertools.accumulate(d["steps"]))
    return LogprobsResult(tuple(d["tokens"]), offsets, tuple(rows), int(d.get("prompt_tokens", 0)))


class LLMClient:
    """What every stage calls an LLM through: one Backend (local model, OpenAI-compatible server, fake) with the
    response cache, retries, concurrency, the usage log and the running spend around it.

    Each request gives a result or a Failure, never an exception (`chat`, the single form, raises LLMError): a
    refused or unparsable call is recorded as a failure by the caller. `calls`, `cache_hits`, the token counts and
    `cost_usd` are what the job's budget reads; a stage declares its clients (Stage.clients) so none escapes it.
    A new kind of model server is a new Backend (llm/base.py), not a new client."""

    def __init__(
        self,
        backend: Backend,
        *,
        cache: ResponseCache | None = None,
        usage: UsageLog | None = None,
        retry: RetryPolicy | None = None,
        price: Price | None = None,
        concurrency: int | None = None,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.usage = usage
        self.retry = retry or RetryPolicy()
        self.price = price or Price()
        self.concurrency = max(1, concurrency or backend.spec.concurrency * max(1, len(backend.spec.base_urls)))
        self.calls = 0  # backend calls made (not cache hits)
        self.cache_hits = 0
        # What this client's calls cost so far (cache hits cost nothing): what a job's budget is checked against.
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost_usd = 0.0

    @property
    def name(self) -> str:
        return f"{self.backend.kind}:{self.backend.model}"

    # -- public, synchronous entry points (each runs its own event loop) --------------------------------------

    def chat_many(self, reqs: Sequence[ChatRequest]) -> list[ChatResult | Failure]:
        return asyncio.run(self._many(reqs, "chat"))

    def logprobs_many(self, reqs: Sequence[LogprobsRequest]) -> list[LogprobsResult | Failure]:
        return asyncio.run(self._many(reqs, "logprobs"))

    def chat(self, req: ChatRequest) -> ChatResult:
        (res,) = self.chat_many([req])
        if isinstance(res, Failure):
            raise LLMError(res.error, backend=self.backend.kind, model=self.backend.model)
        return res

    def capabilities(self) -> Capabilities:
        async def probe() -> Capabilities:
            try:
                return await self.backend.capabilities()
            finally:
                await self.backend.aclose()

        return asyncio.run(probe())

    # -- machinery --------------------------------------------------------------------------------------------

    async def _many(self, reqs: Sequence[Any], kind: str) -> list[Any]:
        try:
            return await self._many_open(reqs, kind)
        finally:
            await self.backend.aclose()

    async def _many_open(self, reqs: Sequence[Any], kind: str) -> list[Any]:
        decode = _chat_from if kind == "chat" else _logprobs_from
        encode: Any = _chat_to if kind == "chat" else _logprobs_to
        results: list[Any] = [None] * len(reqs)
        keys = [request_key(self.backend.kind, self.backend.model, r.payload()) for r in reqs]
        todo: list[int] = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                results[i] = decode(hit)
                self.cache_hits += 1
            else:
                todo.append(i)
        # Identical requests in one batch are sent once.
        first: dict[str, int] = {}
        unique = [i for i in todo if first.setdefault(keys[i], i) == i]
        b = max(1, self.backend.max_batch)
        chunks = [unique[j : j + b] for j in range(0, len(unique), b)]
        sem = asyncio.Semaphore(self.concurrency)

        async def run_chunk(idx: list[int]) -> None:
            async with sem:
                outs = await self._call_chunk([reqs[i] for i in idx], kind)
            for i, res in zip(idx, outs, strict=True):
                results[i] = res
                if not isinstance(res, Failure) and self.cache is not None:
                    stored = reqs[i].stored()
                    if res.endpoint:  # the server that answered, of several (not part of the key)
                        stored = {**stored, "endpoint": res.endpoint}
                    self.cache.put(keys[i], self.backend.kind, self.backend.model, stored, encode(res))

        await asyncio.gather(*(run_chunk(c) for c in chunks))
        for i in todo:
            if results[i] is None:  # a duplicate of an earlier request in this batch
                results[i] = results[first[keys[i]]]
        return results

    async def _call_chunk(self, chunk: list[Any], kind: str) -> list[Any]:
        """Send a chunk with retries; each item ends as a result or a Failure (never raises an LLMError).

        tenacity retries the items whose error is transient; results and permanent failures are kept as they come.
        """
        out: list[Any] = [None] * len(chunk)
        pending = list(range(len(chunk)))
        number = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential_jitter(initial=self.retry.initial_s, max=self.retry.max_s),
            retry=retry_if_exception_type(_StillPending),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    pending = await self._attempt(chunk, pending, out, kind, number)
                    if pending:
                        raise _StillPending
        except _StillPending:
            for i in pending:
                err = out[i]
                msg = f"{type(err).__name__} after {number} attempts: {err}"
                out[i] = Failure(error=msg, kind=RetriesExhausted.__name__, attempts=number)
                self._log(kind, 0, 0, 0.0, "error", msg, number)
        return out

    async def _attempt(self, chunk: list[Any], pending: list[int], out: list[Any], kind: str, number: int) -> list[int]:
        """One try at the pending items; fills `out` and returns the items to try again."""
        batch = [chunk[i] for i in pending]
        t0 = time.perf_counter()
        got: list[Any]
        if len(batch) == 1:
            one = self.backend.chat(batch[0]) if kind == "chat" else self.backend.logprobs(batch[0])
            try:
                got = [await one]
            except LLMError as exc:
                got = [exc]
        else:
            got = await (self.backend.chat_batch(batch) if kind == "chat" else self.backend.logprobs_batch(batch))
        latency = (time.perf_counter() - t0) / len(batch)
        self.calls += len(batch)
        again: list[int] = []
        for i, res in zip(pending, got, strict=True):
            if isinstance(res, LLMError):
                out[i] = res
                if res.transient:
                    again.append(i)
                    continue
                out[i] = Failure(error=str(res), kind=type(res).__name__, attempts=number)
                self._log(kind, 0, 0, latency, "error", str(res), number)
            else:
                out[i] = res
                self._log(kind, res.prompt_tokens, getattr(res, "completion_tokens", 0), latency, "ok", None, number)
        return again

    def _log(
        self, kind: str, prompt: int, completion: int, latency: float, status: str, error: str | None, attempts: int
    ) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cost_usd += self.price.cost(prompt, completion)
        if self.usage is None:
            return
        self.usage.record(
            Usage(
                backend=self.backend.kind,
                model=self.backend.model,
                kind=kind,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_s=latency,
                cost_usd=self.price.cost(prompt, completion),
                status=status,
                error=error,
                attempts=attempts,
            )
        )


class _StillPending(Exception):
    """Raised inside a tenacity attempt while some items of a chunk failed transiently."""


def backend_spec(c: LLMConfig) -> BackendSpec:
    """The backend settings of an [llm.NAME] config block."""
    return BackendSpec(
        backend=c.backend,
        model=c.model,
        base_url=c.base_url,
        base_urls=tuple(c.base_urls or ()),
        api_key_env=c.api_key_env,
        concurrency=c.concurrency,
        timeout_s=c.timeout_s,
        device=c.device,
        batch_size=c.batch_size,
        options=tuple(sorted(c.options.items())),
    )


def client_for(c: LLMConfig, *, cache: ResponseCache | None = None, usage: UsageLog | None = None) -> LLMClient:
    """The client of an [llm.NAME] config block: its backend, retries, prices and concurrency; the response cache
    and usage log are handed in (jobs.make_client wires the store's)."""
    from autointerp.llm.base import make_backend

    return LLMClient(
        make_backend(backend_spec(c)),
        cache=cache,
        usage=usage,
        retry=RetryPolicy(attempts=c.retries),
        price=Price(c.price_prompt, c.price_completion),
        concurrency=c.concurrency * max(1, len(c.base_urls or ())),  # `concurrency` is per server
    )
