"""Any OpenAI-compatible server (OpenAI, `vllm serve`, llama.cpp's server, Ollama) through the `openai` package.

The package's own retries are switched off (max_retries=0) so that the client's tenacity policy is the only one.
Prompt log-probabilities use the completions endpoint with `echo` + `logprobs`; servers that ignore them are
reported as unsupported by `capabilities()` (what `autointerp llm check` prints). Servers lay the echoed
log-probabilities out in two ways (the OpenAI convention, and llama-cpp-python's one position later):
`_rows_follow` tells which from the response itself.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from typing import Any

from autointerp.llm.base import BACKENDS, Backend, BackendSpec, register
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    Message,
    PermanentLLMError,
    TransientLLMError,
    UnreachableError,
    UnsupportedError,
    keep_read,
)

# Status codes worth another try: request timeout, conflict, rate limit, and every server error.
_TRANSIENT_STATUS = {408, 409, 429}
_PING = Message(role="user", content="Say OK.")


@register
class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, spec: BackendSpec, http_client: Any = None) -> None:
        super().__init__(spec)
        self._http_client = http_client
        self._client: Any = None

    def _api(self) -> Any:
        if self._client is None:
            import openai

            key = os.environ.get(self.spec.api_key_env, "") if self.spec.api_key_env else ""
            if self.spec.api_key_env and not key:
                raise PermanentLLMError(
                    f"environment variable {self.spec.api_key_env} (API key for {self.spec.base_url or 'OpenAI'}) "
                    "is not set",
                    backend=self.kind,
                    model=self.model,
                )
            self._client = openai.AsyncOpenAI(
                api_key=key or "not-needed",  # local servers accept any key
                base_url=self.spec.base_url,
                timeout=self.spec.timeout_s,
                max_retries=0,
                http_client=self._http_client or openai.DefaultAsyncHttpxClient(verify=_ssl_context()),
            )
        return self._client

    def _error(self, exc: Exception) -> LLMError:
        import openai

        where = f"{self.spec.base_url or 'api.openai.com'} ({self.model})"
        if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
            return UnreachableError(f"{where}: {type(exc).__name__}: {exc}", backend=self.kind, model=self.model)
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            cls = TransientLLMError if code in _TRANSIENT_STATUS or code >= 500 else PermanentLLMError
            return cls(f"{where}: HTTP {code}: {exc.message}", backend=self.kind, model=self.model)
        if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError | KeyError | TypeError):
            return TransientLLMError(f"{where}: malformed response: {exc}", backend=self.kind, model=self.model)
        return PermanentLLMError(f"{where}: {type(exc).__name__}: {exc}", backend=self.kind, model=self.model)

    async def chat(self, req: ChatRequest) -> ChatResult:
        api = self._api()
        try:
            resp = await api.chat.completions.create(
                model=self.model,
                messages=[{"role": m.role, "content": m.content} for m in req.messages],
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                stop=list(req.stop) or None,
                seed=req.seed,
            )
            choice = resp.choices[0]
            text = choice.message.content
        except Exception as exc:  # mapped to transient / permanent; bugs in our code surface as permanent
            raise self._error(exc) from exc
        if text is None:
            raise TransientLLMError(f"{self.spec.base_url}: response without content", backend=self.kind)
        usage = resp.usage
        return ChatResult(
            text=text,
            finish_reason=str(choice.finish_reason or "stop"),
            prompt_tokens=int(usage.prompt_tokens) if usage else 0,
            completion_tokens=int(usage.completion_tokens) if usage else 0,
        )

    async def logprobs(self, req: LogprobsRequest) -> LogprobsResult:
        api = self._api()
        try:
            resp = await api.completions.create(
                model=self.model,
                prompt=req.prefix + req.prompt,  # servers cache shared prefixes themselves
                max_tokens=1,
                temperature=0.0,
                echo=True,
                logprobs=max(1, req.top_logprobs),
            )
            lp = resp.choices[0].logprobs
        except Exception as exc:
            raise self._error(exc) from exc
        if lp is None or not lp.tokens or not lp.top_logprobs or not lp.text_offset:
            raise UnsupportedError(
                f"{self.spec.base_url}: the server returned no prompt log-probabilities (echo + logprobs)",
                backend=self.kind,
                model=self.model,
            )
        text = req.prefix + req.prompt
        offsets = [int(o) for o in lp.text_offset]
        n_prompt = sum(1 for o in offsets if o < len(text))
        tops = list(lp.top_logprobs)
        if n_prompt < 2 or len(tops) < n_prompt or tops[1] is None:
            raise UnsupportedError(
                f"{self.spec.base_url}: log-probabilities cover the generated token only, not the prompt",
                backend=self.kind,
                model=self.model,
            )
        # We report, for each prompt token, the distribution of the token that follows it.
        if _rows_follow(tops, n_prompt, (resp.choices[0].text or "")[len(text) :]):
            following = [dict(tops[i] or {}) for i in range(n_prompt)]
        else:
            following = [dict(tops[i + 1] or {}) if i + 1 < len(tops) else {} for i in range(n_prompt)]
        keep = [i for i in range(n_prompt) if offsets[i] >= len(req.prefix)]  # the result covers `prompt` only
        full = LogprobsResult(
            tokens=tuple(lp.tokens[i] for i in keep),
            offsets=tuple(offsets[i] for i in keep),
            logprobs=tuple(following[i] for i in keep),
            prompt_tokens=int(resp.usage.prompt_tokens) if resp.usage else n_prompt,
        )
        return keep_read(req, full)  # the server echoes every row; the caller reads (and the cache keeps) a few

    async def capabilities(self) -> Capabilities:
        await self.chat(ChatRequest(messages=(_PING,), max_tokens=4))
        try:
            await self.logprobs(LogprobsRequest(prompt="The cat sat on the mat.", top_logprobs=5))
        except LLMError as exc:
            return Capabilities(chat=True, prompt_logprobs=False, note=str(exc))
        return Capabilities(chat=True, prompt_logprobs=True)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


@functools.cache
def _ssl_context() -> Any:
    """The process's one TLS context: the client is rebuilt for every batch (one event loop each), and loading the
    trusted certificates costs tens of milliseconds each time, per server."""
    import httpx2

    return httpx2.create_ssl_context()


def _openai(spec: BackendSpec) -> Backend:
    """One server, or a pool of them when the block names several (base_urls)."""
    if spec.base_urls:
        from autointerp.llm.endpoints import EndpointPool

        return EndpointPool(spec, [OpenAIBackend(replace(spec, base_url=u, base_urls=())) for u in spec.base_urls])
    return OpenAIBackend(spec)


BACKENDS[OpenAIBackend.kind] = _openai


def _rows_follow(tops: list[Any], n_prompt: int, generated: str) -> bool:
    """Whether echoed top_logprobs[i] holds what FOLLOWS token i, rather than the alternatives OF token i.

    The OpenAI convention (vLLM) puts at i the distribution that produced token i and lists the generated token
    after the prompt. llama-cpp-python puts at i its scores[i], the distribution after token i, nulls entry 0, and
    lists the prompt tokens only (llama_cpp/llama.py, create_completion with echo). The greedy generated token
    (temperature 0) tells them apart: it tops the distribution after the whole prompt, which is entry
    n_prompt - 1 in the second layout and entry n_prompt in the first. When that does not settle it, a list that
    stops at the prompt is taken as llama-cpp-python's.
    """

    def starts_generated(row: Any) -> bool:
        if not row or not generated:
            return False
        best = max(row.items(), key=lambda kv: kv[1])[0]
        return bool(best) and generated.startswith(best)

    at_last = starts_generated(tops[n_prompt - 1])
    after_last = len(tops) > n_prompt and starts_generated(tops[n_prompt])
    if at_last != after_last:
        return at_last
    return len(tops) == n_prompt
