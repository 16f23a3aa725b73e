"""A scripted backend shipped with the library: unit tests and `backend = "fake"` dry runs use it, no model needed.

By default it answers a chat with the first <<marked>> token of the last user message ("Explanation: the token
'X'") and gives log-probabilities that put all mass on the first candidate ("0"). Tests replace `responder` to
script answers or faults, and `next_token` to script the distribution that follows each prompt token (it sees the
text up to and including that token). Prompts are split into runs of non-space characters and single whitespace
characters, so "tok\tunknown\n" is four tokens. `fake_client` builds the client over one: the one factory tests use.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autointerp.llm.base import Backend, BackendSpec, register
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    keep_read,
    read_rows,
)

if TYPE_CHECKING:
    from autointerp.llm.client import LLMClient, RetryPolicy

_MARK = re.compile(r"<<(.+?)>>")
_TOKEN = re.compile(r"\S+|\s")

Responder = Callable[[ChatRequest], "str | ChatResult | LLMError"]
NextToken = Callable[[str], "dict[str, float] | LLMError"]


_LIST_OF = re.compile(r"JSON list of (\d+)")
_EXPLANATION = re.compile(r"^Explanation: (.*)$", re.M)
_TEXT = re.compile(r"^Text \d+: (.*)$", re.M)


def default_answer(req: ChatRequest) -> str:
    last = next((m.content for m in reversed(req.messages) if m.role == "user"), "")
    if _LIST_OF.search(last):
        # Yes/no judgements: 1 where a word of the explanation occurs in the text (inside the marks, if any).
        expl = _EXPLANATION.search(last)
        words = {w.strip("'\".,").lower() for w in (expl.group(1) if expl else "").split() if len(w) > 3}
        texts = _TEXT.findall(last)
        spans = [" ".join(_MARK.findall(t)) if "<<" in t else t for t in texts]
        return str([int(any(w in s.lower() for w in words)) for s in spans])
    found = _MARK.findall(last)
    return f"Explanation: the token {found[0].strip()!r}" if found else "Explanation: no clear pattern"


@register
class FakeBackend(Backend):
    kind = "fake"

    def __init__(
        self, spec: BackendSpec, responder: Responder | None = None, next_token: NextToken | None = None
    ) -> None:
        super().__init__(spec)
        self.responder: Responder = responder or default_answer
        self.next_token = next_token
        self.requests: list[ChatRequest] = []
        self.logprob_requests: list[LogprobsRequest] = []
        # options = {delay_s = 0.05}: every call takes this long, like a server (tests and benchmarks of jobs)
        self.delay_s = float(dict(spec.options).get("delay_s", 0.0))

    async def chat(self, req: ChatRequest) -> ChatResult:
        self.requests.append(req)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        got = self.responder(req)
        if isinstance(got, LLMError):
            raise got
        if isinstance(got, ChatResult):
            return got
        prompt = sum(len(m.content.split()) for m in req.messages)
        return ChatResult(text=got, finish_reason="stop", prompt_tokens=prompt, completion_tokens=len(got.split()))

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        self.logprob_requests.append(req)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        text = req.prefix + req.prompt
        # Like the real backends: the model reads prefix + prompt, the result covers the prompt's tokens only.
        found = [m for m in _TOKEN.finditer(text) if m.start() >= len(req.prefix)]
        cands = req.candidates or ("0",)
        offsets = tuple(m.start() for m in found)
        # like the real backends, a request with read_at gets the rows before its read offsets only
        wanted = set(read_rows(offsets, req.read_at)) if req.read_at else range(len(found))
        rows: list[dict[str, float]] = []
        for i, m in enumerate(found):
            if i not in wanted:
                rows.append({})
            elif self.next_token is None:
                rows.append({c: (0.0 if c == cands[0] else -30.0) for c in cands})
            else:
                got = self.next_token(text[: m.end()])
                if isinstance(got, LLMError):
                    raise got
                rows.append(got)
        n = sum(1 for _ in _TOKEN.finditer(text))
        return keep_read(req, LogprobsResult(tuple(m.group() for m in found), offsets, tuple(rows), n))

    async def capabilities(self) -> Capabilities:
        return Capabilities(chat=True, prompt_logprobs=True, note="scripted fake backend")


def fake_client(
    responder: Responder | None = None,
    next_token: NextToken | None = None,
    *,
    model: str = "m",
    retry: RetryPolicy | None = None,
    **client_options: Any,
) -> LLMClient:
    """An LLMClient over a new FakeBackend of `model`: `responder` scripts chat answers (or faults), `next_token` the
    log-probabilities (both default as the backend's). `client.backend` is the FakeBackend, with the requests it
    saw. One attempt and no wait unless `retry` says otherwise (a fake fails only where a test scripts it to);
    `client_options` go to LLMClient (cache, usage, price, concurrency)."""
    from autointerp.llm.client import LLMClient, RetryPolicy

    backend = FakeBackend(BackendSpec(backend="fake", model=model), responder, next_token)
    return LLMClient(backend, retry=retry or RetryPolicy(attempts=1, initial_s=0.0, max_s=0.0), **client_options)
