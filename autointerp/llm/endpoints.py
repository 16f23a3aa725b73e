"""Several OpenAI-compatible servers of one model behind one backend (`[llm.NAME] base_urls = [...]`).

The fan-out lives here, below the LLM client, so that every stage and every executor gets it unchanged: the
client's cache key (backend kind + model + request) is the same whichever server answers, so nothing is asked
twice, and the client's concurrency is the sum of the servers' slots. Each request goes to the up server with
the fewest requests in flight (each server has `concurrency` slots). A server that does not answer (connection
refused or dropped, timeout) is marked down for `cooldown_s` and the request goes to another server at once,
without counting as one of the client's retries; after the cooldown the server gets requests again. When every
server is down the request goes to the one that went down first, so the pool behaves like one server then and the
client's retries with backoff apply. Other errors (429, 5xx, refused requests) are the client's to handle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from autointerp.llm.base import Backend, BackendSpec
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LogprobsRequest,
    LogprobsResult,
    UnreachableError,
)

R = TypeVar("R", ChatResult, LogprobsResult)
COOLDOWN_S = 30.0


@dataclass
class Endpoint:
    """One server of the pool and what the pool knows of it."""

    url: str
    backend: Backend
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic() before which no request is sent to it (unless all are down)
    served: int = 0  # answers it gave
    failures: int = 0  # times it did not answer


class EndpointPool(Backend):
    """One backend per server (`members`, in the order of base_urls), one request at a time per slot."""

    kind = "openai"

    def __init__(self, spec: BackendSpec, members: Sequence[Backend], cooldown_s: float = COOLDOWN_S) -> None:
        super().__init__(spec)
        if not members:
            raise ValueError("an endpoint pool needs at least one server")
        urls = spec.base_urls or tuple(m.spec.base_url or "" for m in members)
        self.endpoints = [Endpoint(u, m) for u, m in zip(urls, members, strict=True)]
        self.slots = max(1, spec.concurrency)
        self.cooldown_s = cooldown_s
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        # the client runs each batch in its own event loop (asyncio.run): the condition belongs to the current one
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:
            self._cond, self._loop = asyncio.Condition(), loop
            for e in self.endpoints:
                e.in_flight = 0
        return self._cond

    def _pick(self, tried: set[int]) -> int | None:
        """The endpoint to send to now: an up one with a free slot and the fewest in flight (ties: fewest served);
        when none is up, the one down longest (with a free slot); None when all the candidates are busy."""
        now = time.monotonic()
        free = [i for i, e in enumerate(self.endpoints) if i not in tried and e.in_flight < self.slots]
        up = [i for i in free if self.endpoints[i].down_until <= now]
        if up:
            return min(up, key=lambda i: (self.endpoints[i].in_flight, self.endpoints[i].served, i))
        if any(self.endpoints[i].down_until <= now for i in range(len(self.endpoints)) if i not in tried):
            return None  # an up server is busy: wait for its slot rather than try a down one
        return min(free, key=lambda i: self.endpoints[i].down_until) if free else None

    async def _send(self, call: Callable[[Backend], Awaitable[R]]) -> R:
        cond = self._condition()
        tried: set[int] = set()
        last: UnreachableError | None = None
        while True:
            async with cond:
                await cond.wait_for(lambda: self._pick(tried) is not None or len(tried) == len(self.endpoints))
                i = self._pick(tried)
                if i is None:  # every server was tried for this request and none answered
                    assert last is not None
                    raise last
                ep = self.endpoints[i]
                ep.in_flight += 1
            try:
                res = await call(ep.backend)
            except UnreachableError as exc:
                ep.failures += 1
                ep.down_until = time.monotonic() + self.cooldown_s
                tried.add(i)
                last = exc
                continue
            else:
                ep.served += 1
                ep.down_until = 0.0
                return replace(res, endpoint=ep.url)
            finally:
                async with cond:
                    ep.in_flight -= 1
                    cond.notify_all()

    async def chat(self, req: ChatRequest) -> ChatResult:
        return await self._send(lambda b: b.chat(req))

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        return await self._send(lambda b: b.logprobs(req))

    async def capabilities(self) -> Capabilities:
        """What the first server that answers can do (the servers run the same model)."""
        last: UnreachableError | None = None
        for e in self.endpoints:
            try:
                return await e.backend.capabilities()
            except UnreachableError as exc:
                last = exc
        assert last is not None
        raise last

    async def aclose(self) -> None:
        for e in self.endpoints:
            await e.backend.aclose()
