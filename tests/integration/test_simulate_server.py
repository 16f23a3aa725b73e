"""The all-at-once simulator over HTTP: llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) serving the
shipped SmolLM2 GGUF, with the shared prefix sent as text. Its echoed log-probabilities are laid out one position
later than the OpenAI convention; read right, every slot has its digits and the predictions follow the in-process
model's (the same weights, dequantized), read wrong they would not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from autointerp.llm.base import BackendSpec, make_backend
from autointerp.llm.client import LLMClient
from autointerp.prompts import Prompt, load_prompt
from autointerp.score.simulate import LogprobSimulator, make_simulator

pytestmark = pytest.mark.slow

RECORDS = [
    [" The", " state", " of", " the", " Union", " is", " strong", "."],
    [" 10", "\n", "\t", "🙂", " café", "unknown", " Union"],
]


def _short_prompt() -> Prompt:
    """The first 20 lines of the first few-shot block only: llama-cpp-python sorts the whole vocabulary in Python
    for every echoed prompt token, so the prompt stays short. (Without any shot the small model expects the word
    `unknown` rather than a digit at the slots, and the digits fall out of the server's top 20: SimFailures.)"""
    p = load_prompt("simulate")
    explanation, lines = p.shots[0]
    return dataclasses.replace(p, shots=((explanation, "\n".join(lines.splitlines()[:20]) + "\n"),))


def test_logprob_simulator_over_llama_cpp_matches_the_local_model(llama_server_url: str, smol_dir: Path) -> None:
    client = LLMClient(make_backend(BackendSpec(backend="openai", model="smollm2", base_url=llama_server_url)))
    assert isinstance(make_simulator(client), LogprobSimulator)  # the server reports prompt logprobs
    calls = client.calls
    served = LogprobSimulator(client, _short_prompt()).simulate("the word Union", RECORDS)
    assert client.calls - calls == len(RECORDS)  # one completion (one pass) per record
    local = LogprobSimulator(
        LLMClient(make_backend(BackendSpec(backend="local", model="smollm2-135m-instruct"))), _short_prompt()
    ).simulate("the word Union", RECORDS)
    assert smol_dir.exists()
    for s, loc, rec in zip(served, local, RECORDS, strict=True):
        assert isinstance(s, list) and isinstance(loc, list), (s, loc)
        assert len(s) == len(loc) == len(rec) and all(0 <= v <= 10 for v in s)
    a, b = np.concatenate(served), np.concatenate(local)
    # 4-bit arithmetic on the server, float32 in-process (dequantized from the same GGUF): close, not equal
    assert float(np.corrcoef(a, b)[0, 1]) > 0.6
    assert float(np.abs(a - b).max()) < 2.0
