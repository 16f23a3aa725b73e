"""The same contract for every backend: a chat answer with token counts, batches keep their order, prompt
log-probabilities aligned with character offsets. Runs on the fake and the real local SmolLM2 here; on the vLLM
backend where vLLM is installed (GPU machines); the OpenAI-compatible one is covered against a real llama.cpp
server in tests/integration/test_llama_server.py."""

from __future__ import annotations

import importlib.util

import pytest

from autointerp.llm.base import BackendSpec, make_backend
from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, ChatResult, LogprobsRequest, LogprobsResult, Message

BACKENDS = [
    pytest.param(BackendSpec(backend="fake", model="m"), id="fake"),
    pytest.param(
        BackendSpec(backend="local", model="smollm2-135m-instruct", batch_size=4),
        id="local",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        BackendSpec(backend="vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct", batch_size=4),
        id="vllm",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("vllm") is None, reason="vLLM is the optional GPU extra, not installed here"
        ),
    ),
]


@pytest.mark.parametrize("spec", BACKENDS)
def test_chat_batch_keeps_order_and_counts_tokens(spec: BackendSpec) -> None:
    client = LLMClient(make_backend(spec))
    reqs = [ChatRequest(messages=(Message("user", f"Repeat the number {i}."),), max_tokens=6, seed=i) for i in range(3)]
    out = client.chat_many(reqs)
    assert len(out) == 3
    for res in out:
        assert isinstance(res, ChatResult)
        assert res.prompt_tokens > 0 and 0 <= res.completion_tokens <= 6
        assert res.finish_reason in ("stop", "length")
    again = client.chat_many(reqs[::-1])
    assert [r.text for r in again] == [r.text for r in out][::-1]  # greedy and deterministic, order kept


@pytest.mark.parametrize("spec", BACKENDS)
def test_prompt_logprobs_are_aligned_with_offsets(spec: BackendSpec) -> None:
    client = LLMClient(make_backend(spec))
    prompt = "Value: 3\nValue: 7\n"
    (res,) = client.logprobs_many([LogprobsRequest(prompt=prompt, candidates=("3", "7"), top_logprobs=3)])
    assert isinstance(res, LogprobsResult)
    assert len(res.tokens) == len(res.offsets) == len(res.logprobs)
    assert list(res.offsets) == sorted(res.offsets) and res.offsets[0] == 0
    for tok, off in zip(res.tokens, res.offsets, strict=True):
        assert prompt[off:].startswith(tok.strip(" ")[:1]) or not tok.strip()
    if spec.backend != "fake":
        # the distribution after "Value:" (before " 3") gives both candidates a probability
        slot = max(i for i, o in enumerate(res.offsets) if o < prompt.index("3"))
        assert {"3", "7"} <= set(res.logprobs[slot])
        assert all(v <= 0 for v in res.logprobs[slot].values())
