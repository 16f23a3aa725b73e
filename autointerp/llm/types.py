"""Typed, frozen records that cross the LLM boundary, and the errors a backend may raise.

Requests are plain data so that their canonical JSON is the response-cache key: the same request on the same
backend and model never costs a second call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def payload(self) -> dict[str, Any]:
        return {"kind": "chat", **asdict(self)}

    def stored(self) -> dict[str, Any]:
        """The request as the response cache stores it beside the answer: its payload."""
        return self.payload()


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # stop | length | ...
    prompt_tokens: int
    completion_tokens: int
    # which server answered, where a block names several (base_urls); not part of the cached answer
    endpoint: str = field(default="", compare=False)


@dataclass(frozen=True)
class LogprobsRequest:
    """Log-probabilities of the next token after every prefix of `prompt`, restricted to `candidates`.

    `candidates` are strings that each tokenize to one token of the scoring model (e.g. "0".."9" for the
    simulator); a backend that can only return the top-k alternatives fills what it saw and leaves the rest out.

    `prefix` is text that many requests share (the simulator's instructions, few-shot examples and explanation):
    the model reads prefix + prompt, but the result covers the tokens of `prompt` only, with offsets counted from
    the start of the prefix. The local backend encodes a prefix once and reuses its key/value cache; servers get
    the concatenation and do their own prefix caching. The local backend keeps the joint tokenization of
    prefix + prompt when it splits at the boundary, else tokenizes the prompt on its own: end the prefix with a
    newline so that the two agree.

    `read_at` names the character offsets (counted like the result's offsets) where the caller reads the
    distribution of the token that starts there, i.e. the row of the token before it. When given, only those rows
    are filled (`read_rows`), every other row is empty, and with `candidates` a filled row holds the candidates
    only (all of them on backends that see the whole distribution, those among the top `top_logprobs` on
    servers): what the simulator reads at its slots, a fraction of every row's top-k, so that the response cache
    stays small and the local backend runs its LM head at those positions only.
    """

    prompt: str
    candidates: tuple[str, ...] = ()
    top_logprobs: int = 5
    prefix: str = ""
    read_at: tuple[int, ...] = ()

    def payload(self) -> dict[str, Any]:
        d = {"kind": "logprobs", **asdict(self)}
        # requests without a prefix or read offsets keep the cache keys they had before those fields existed
        if not self.prefix:
            del d["prefix"]
        if not self.read_at:
            del d["read_at"]
        return d

    def stored(self) -> dict[str, Any]:
        """The request as the response cache stores it beside the answer: the payload with the shared prefix as its
        SHA-256 and length (a feature's records share it, and the key already covers its text)."""
        d = self.payload()
        if self.prefix:
            digest = hashlib.sha256(self.prefix.encode("utf-8", "surrogatepass")).hexdigest()
            d["prefix"] = {"sha256": digest, "chars": len(self.prefix)}
        return d


@dataclass(frozen=True)
class LogprobsResult:
    tokens: tuple[str, ...]  # the prompt's tokens as the scoring model split them
    offsets: tuple[int, ...]  # character offset of each token in the prompt
    # logprobs[i] maps a candidate (or top-k alternative) to its log-probability as the token AFTER tokens[:i+1];
    # for a request with read_at, only the rows before a read offset are filled, the others are {}
    logprobs: tuple[dict[str, float], ...]
    prompt_tokens: int = 0
    endpoint: str = field(default="", compare=False)  # as ChatResult.endpoint


def read_rows(offsets: Sequence[int], read_at: Sequence[int]) -> list[int]:
    """Indices of the rows a request with `read_at` fills: row i when token i + 1 starts at a read offset (an offset
    inside a token, or at the prompt's first token, whose row lies in the prefix, has no row)."""
    wanted = set(read_at)
    return [i for i in range(len(offsets) - 1) if offsets[i + 1] in wanted]


def keep_read(req: LogprobsRequest, res: LogprobsResult) -> LogprobsResult:
    """A result with every row filled, cut to what `req.read_at` asks for (servers compute every row anyway)."""
    if not req.read_at:
        return res
    rows: list[dict[str, float]] = [{} for _ in res.logprobs]
    cands = set(req.candidates)
    for i in read_rows(res.offsets, req.read_at):
        rows[i] = {k: v for k, v in res.logprobs[i].items() if k in cands} if cands else dict(res.logprobs[i])
    return LogprobsResult(res.tokens, res.offsets, tuple(rows), res.prompt_tokens)


@dataclass(frozen=True)
class Usage:
    """One call as the usage log sees it."""

    backend: str
    model: str
    kind: str  # chat | logprobs
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    status: str  # ok | error
    error: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Capabilities:
    chat: bool = True
    prompt_logprobs: bool = False
    note: str = ""


class LLMError(RuntimeError):
    """A call that did not produce a result. `transient` errors are retried; the rest fail at once."""

    transient: bool = False

    def __init__(self, message: str, *, backend: str = "", model: str = "") -> None:
        super().__init__(message)
        self.backend = backend
        self.model = model


class TransientLLMError(LLMError):
    """Timeouts, rate limits (429), server errors (5xx), dropped connections, garbled responses."""

    transient = True


class UnreachableError(TransientLLMError):
    """The server did not answer: connection refused or dropped, or no response within the timeout. Where a block
    names several servers, the request goes to another one at once."""


class PermanentLLMError(LLMError):
    """Refused requests (4xx other than 429), authentication, unknown model: retrying cannot help."""


class UnsupportedError(PermanentLLMError):
    """The backend cannot do this (e.g. prompt log-probabilities on a server that does not return them)."""


class RetriesExhausted(LLMError):
    """A transient failure that persisted through every retry."""


@dataclass(frozen=True)
class Failure:
    """What a batch call returns in place of a result: the error, kept as data so a caller can store it."""

    error: str
    kind: str  # class name of the LLMError
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def request_key(backend: str, model: str, payload: dict[str, Any]) -> str:
    """Cache key of a request: the backend, the model and every request parameter."""
    blob = json.dumps({"backend": backend, "model": model, **payload}, sort_keys=True, ensure_ascii=False)
    # surrogatepass: a lone surrogate in a model's answer (re-asked back to it) is hashed, not a crash; any valid
    # text encodes as plain UTF-8, so the keys of the cache are unchanged.
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
