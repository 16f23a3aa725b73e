"""The LLM client: cache, retries of transient faults only, usage accounting; the OpenAI-compatible backend against
an httpx mock transport that injects every fault class (timeout, 429, 500, malformed JSON, truncated answer)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest

from autointerp.llm.base import BackendSpec
from autointerp.llm.client import LLMClient, MemoryCache, MemoryUsage, RetryPolicy
from autointerp.llm.fake import fake_client
from autointerp.llm.openai_backend import OpenAIBackend
from autointerp.llm.types import (
    ChatRequest,
    ChatResult,
    Failure,
    LogprobsRequest,
    Message,
    PermanentLLMError,
    TransientLLMError,
)

FAST = RetryPolicy(attempts=3, initial_s=0.001, max_s=0.002)


def req(text: str = "hello") -> ChatRequest:
    return ChatRequest(messages=(Message("user", text),), max_tokens=16)


def test_cache_makes_a_rerun_free() -> None:
    cache, usage = MemoryCache(), MemoryUsage()
    client = fake_client(cache=cache, usage=usage, retry=FAST)
    first = client.chat_many([req("a <<x>>"), req("b"), req("a <<x>>")])
    assert client.calls == 2  # the duplicate request is sent once
    client2 = fake_client(cache=cache, usage=usage, retry=FAST)
    be2 = client2.backend
    again = client2.chat_many([req("a <<x>>"), req("b"), req("a <<x>>")])
    assert again == first and client2.calls == 0 and client2.cache_hits == 3 and not be2.requests
    assert [u.status for u in usage.rows] == ["ok", "ok"]


def test_cache_key_covers_every_parameter() -> None:
    cache = MemoryCache()
    client = fake_client(cache=cache, retry=FAST)
    client.chat_many([req("a")])
    client.chat_many([ChatRequest(messages=(Message("user", "a"),), max_tokens=17)])
    client.chat_many([ChatRequest(messages=(Message("user", "a"),), max_tokens=16, temperature=0.5)])
    assert client.calls == 3


def test_transient_errors_are_retried_then_succeed() -> None:
    seen: list[int] = []

    def flaky(r: ChatRequest) -> Any:
        seen.append(1)
        return TransientLLMError("429") if len(seen) < 3 else "Explanation: ok"

    usage = MemoryUsage()
    client = fake_client(flaky, usage=usage, retry=FAST)
    (res,) = client.chat_many([req()])
    assert isinstance(res, ChatResult) and res.text == "Explanation: ok"
    assert len(seen) == 3 and usage.rows[-1].attempts == 3


def test_exhausted_retries_and_permanent_errors_are_failures_not_results() -> None:
    usage, cache = MemoryUsage(), MemoryCache()

    def answer(r: ChatRequest) -> Any:
        if "down" in r.messages[0].content:
            return TransientLLMError("503 service unavailable")
        if "bad" in r.messages[0].content:
            return PermanentLLMError("400 bad request")
        return "fine"

    client = fake_client(answer, usage=usage, cache=cache, retry=FAST)
    be = client.backend
    down, bad, fine = client.chat_many([req("down"), req("bad"), req("fine")])
    assert isinstance(down, Failure) and down.kind == "RetriesExhausted" and down.attempts == 3
    assert isinstance(bad, Failure) and bad.kind == "PermanentLLMError" and bad.attempts == 1
    assert isinstance(fine, ChatResult)
    assert sum(1 for r in be.requests if r.messages[0].content == "bad") == 1  # never retried
    assert len(cache.data) == 1  # failures are never cached
    assert sorted(u.status for u in usage.rows) == ["error", "error", "ok"]


def test_bugs_are_not_swallowed_as_llm_failures() -> None:
    def broken(r: ChatRequest) -> Any:
        raise ZeroDivisionError("bug")

    client = fake_client(broken, retry=FAST)
    with pytest.raises(ZeroDivisionError):
        client.chat_many([req()])


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible backend over a mock transport


def _completion(text: str = "Explanation: dates", finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


def _openai_client(script: list[Any], seen: list[httpx2.Request], **kw: Any) -> LLMClient:
    """A client whose server answers with the scripted items in order (an exception is raised by the transport)."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        item = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(item, Exception):
            raise item
        if isinstance(item, httpx2.Response):
            return item
        return httpx2.Response(200, json=item)

    spec = BackendSpec(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", **kw)
    be = OpenAIBackend(spec, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    return LLMClient(be, retry=FAST, usage=MemoryUsage())


@pytest.mark.parametrize(
    "fault",
    [
        httpx2.ReadTimeout("timed out"),
        httpx2.ConnectError("refused"),
        httpx2.Response(429, json={"error": {"message": "slow down"}}),
        httpx2.Response(500, json={"error": {"message": "boom"}}),
        httpx2.Response(503, text="unavailable"),
        httpx2.Response(200, content=b'{"id": "c1", "choices": [', headers={"content-type": "application/json"}),
    ],
    ids=["timeout", "connection", "429", "500", "503", "malformed-json"],
)
def test_each_transient_fault_is_retried_then_succeeds(fault: Any) -> None:
    seen: list[httpx2.Request] = []
    client = _openai_client([fault, _completion()], seen)
    (res,) = client.chat_many([req()])
    assert isinstance(res, ChatResult), res
    assert res.text == "Explanation: dates" and res.prompt_tokens == 11 and len(seen) == 2


@pytest.mark.parametrize(
    "fault",
    [httpx2.ReadTimeout("timed out"), httpx2.Response(500, json={"error": {"message": "boom"}})],
    ids=["timeout", "500"],
)
def test_persistent_fault_ends_as_failure(fault: Any) -> None:
    seen: list[httpx2.Request] = []
    client = _openai_client([fault], seen)
    (res,) = client.chat_many([req()])
    assert isinstance(res, Failure) and res.kind == "RetriesExhausted" and len(seen) == 3


def test_refused_request_fails_at_once() -> None:
    seen: list[httpx2.Request] = []
    client = _openai_client([httpx2.Response(400, json={"error": {"message": "context too long"}})], seen)
    (res,) = client.chat_many([req()])
    assert isinstance(res, Failure) and "400" in res.error and len(seen) == 1


def test_truncated_answer_is_reported_with_its_finish_reason() -> None:
    seen: list[httpx2.Request] = []
    client = _openai_client([_completion("Explanation: the tokens that", "length")], seen)
    (res,) = client.chat_many([req()])
    assert isinstance(res, ChatResult) and res.finish_reason == "length"


def test_api_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", "sk-test-secret-123")
    seen: list[httpx2.Request] = []
    client = _openai_client([_completion()], seen, api_key_env="AUTOINTERP_TEST_KEY")
    client.chat_many([req()])
    assert seen[0].headers["authorization"] == "Bearer sk-test-secret-123"


def test_missing_api_key_variable_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOINTERP_NO_SUCH_KEY", raising=False)
    client = _openai_client([_completion()], [], api_key_env="AUTOINTERP_NO_SUCH_KEY")
    (res,) = client.chat_many([req()])
    assert isinstance(res, Failure) and "AUTOINTERP_NO_SUCH_KEY" in res.error


def test_prompt_logprobs_through_completions_echo() -> None:
    prompt = "The cat"
    body = {
        "id": "x",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "text": prompt + " sat",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": ["The", " cat", " sat"],
                    "text_offset": [0, 3, 7],
                    "token_logprobs": [None, -3.0, -1.0],
                    "top_logprobs": [None, {" cat": -3.0, " dog": -2.0}, {" sat": -1.0, " ran": -2.5}],
                },
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    seen: list[httpx2.Request] = []
    client = _openai_client([body], seen)
    (res,) = client.logprobs_many([LogprobsRequest(prompt=prompt, top_logprobs=2)])
    assert not isinstance(res, Failure)
    assert res.tokens == ("The", " cat") and res.offsets == (0, 3)
    assert res.logprobs[0] == {" cat": -3.0, " dog": -2.0}  # what follows "The"
    assert res.logprobs[1] == {" sat": -1.0, " ran": -2.5}  # what follows "The cat"
    sent = json.loads(seen[0].content)
    assert sent["echo"] is True and sent["logprobs"] == 2


def test_server_without_prompt_logprobs_is_unsupported() -> None:
    body = {
        "id": "x",
        "object": "text_completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "text": " sat", "finish_reason": "length", "logprobs": None}],
    }
    client = _openai_client([body], [])
    (res,) = client.logprobs_many([LogprobsRequest(prompt="The cat")])
    assert isinstance(res, Failure) and res.kind == "UnsupportedError"
