"""A scripted backend shipped with the library: unit tests and `backend = "fake"` dry runs use it, no model needed.

By default it answers a chat with the first <<marked>> token of the last user message ("Explanation: the token
'X'") and gives log-probabilities that put all mass on "0". Tests replace `responder` to script answers or faults.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from autointerp.llm.base import Backend, BackendSpec, register
from autointerp.llm.types import Capabilities, ChatRequest, ChatResult, LLMError, LogprobsRequest, LogprobsResult

_MARK = re.compile(r"<<(.+?)>>")

Responder = Callable[[ChatRequest], "str | ChatResult | LLMError"]


def default_answer(req: ChatRequest) -> str:
    last = next((m.content for m in reversed(req.messages) if m.role == "user"), "")
    found = _MARK.findall(last)
    return f"Explanation: the token {found[0].strip()!r}" if found else "Explanation: no clear pattern"


@register
class FakeBackend(Backend):
    kind = "fake"

    def __init__(self, spec: BackendSpec, responder: Responder | None = None) -> None:
        super().__init__(spec)
        self.responder: Responder = responder or default_answer
        self.requests: list[ChatRequest] = []

    async def chat(self, req: ChatRequest) -> ChatResult:
        self.requests.append(req)
        got = self.responder(req)
        if isinstance(got, LLMError):
            raise got
        if isinstance(got, ChatResult):
            return got
        prompt = sum(len(m.content.split()) for m in req.messages)
        return ChatResult(text=got, finish_reason="stop", prompt_tokens=prompt, completion_tokens=len(got.split()))

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        words = req.prompt.split(" ")
        offsets, pos = [], 0
        for w in words:
            offsets.append(pos)
            pos += len(w) + 1
        cands = req.candidates or ("0",)
        dist = {c: (0.0 if c == cands[0] else -30.0) for c in cands}
        return LogprobsResult(tuple(words), tuple(offsets), tuple(dict(dist) for _ in words), len(words))

    async def capabilities(self) -> Capabilities:
        return Capabilities(chat=True, prompt_logprobs=True, note="scripted fake backend")
