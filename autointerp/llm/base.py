"""The backend contract and its registry. A backend turns requests into results or raises an LLMError."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    UnsupportedError,
)

T = TypeVar("T", ChatResult, LogprobsResult)


@dataclass(frozen=True)
class BackendSpec:
    """What a backend needs to start; built from an [llm.NAME] config block. Holds the NAME of the API-key
    variable, never the key itself, so specs can be logged and stored."""

    backend: str
    model: str
    base_url: str | None = None
    base_urls: tuple[str, ...] = ()  # several servers of one model (llm/endpoints.py); concurrency is per server
    api_key_env: str | None = None
    concurrency: int = 4
    timeout_s: float = 120.0
    device: str = "cpu"
    batch_size: int = 8
    options: tuple[tuple[str, str], ...] = ()


class Backend(ABC):
    """One way of reaching a model. Subclasses register themselves in BACKENDS under `kind`."""

    kind: ClassVar[str] = ""
    # Requests a backend handles in one call (local models batch on the device); servers take one at a time.
    max_batch: int = 1

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec

    @property
    def model(self) -> str:
        return self.spec.model

    @abstractmethod
    async def chat(self, req: ChatRequest) -> ChatResult: ...

    async def chat_batch(self, reqs: Sequence[ChatRequest]) -> list[ChatResult | LLMError]:
        """Several requests at once; an item that fails is returned as its error, not raised."""
        out = await asyncio.gather(*(self.chat(r) for r in reqs), return_exceptions=True)
        return [_as_result(x) for x in out]

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:  # noqa: ARG002
        raise UnsupportedError(f"backend {self.kind} has no prompt log-probabilities", backend=self.kind)

    async def logprobs_batch(self, reqs: Sequence[LogprobsRequest]) -> list[LogprobsResult | LLMError]:
        out = await asyncio.gather(*(self.logprobs(r) for r in reqs), return_exceptions=True)
        return [_as_result(x) for x in out]

    async def capabilities(self) -> Capabilities:
        return Capabilities(chat=True, prompt_logprobs=False)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or models."""


def _as_result(x: T | BaseException) -> T | LLMError:
    if isinstance(x, LLMError):
        return x
    if isinstance(x, BaseException):
        raise x  # a bug, not an LLM failure: let it surface
    return x


def only(results: Sequence[T | LLMError]) -> T:
    """The result of a batch of one request; its error raised (for backends whose single calls go through their
    batch method)."""
    (res,) = results
    if isinstance(res, LLMError):
        raise res
    return res


BACKENDS: dict[str, Callable[[BackendSpec], Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.kind] = cls
    return cls


def make_backend(spec: BackendSpec) -> Backend:
    # Importing the modules registers the built-in backends; heavy libraries load only inside them, lazily.
    from autointerp.llm import fake, local, openai_backend, vllm_backend  # noqa: F401

    try:
        factory = BACKENDS[spec.backend]
    except KeyError:
        raise LLMError(f"unknown LLM backend {spec.backend!r}: choose one of {', '.join(sorted(BACKENDS))}") from None
    return factory(spec)
