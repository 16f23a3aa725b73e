"""The local backend's greedy chat over a shared prefix's cache (llm/decode.py) answers what `generate` answers on
the whole prompts, runs the shared instructions once, and runs each request over its own tokens only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autointerp.llm.base import BackendSpec, make_backend
from autointerp.llm.client import LLMClient
from autointerp.llm.local import LocalBackend
from autointerp.llm.types import ChatRequest, ChatResult, Message
from autointerp.prompts import load_prompt

pytestmark = pytest.mark.slow


@pytest.fixture()
def smol(smol_dir: Path) -> Iterator[LocalBackend]:
    be = make_backend(BackendSpec(backend="local", model="smollm2-135m-instruct", batch_size=8))
    assert isinstance(be, LocalBackend) and smol_dir.exists()
    yield be


def forward_rows(be: LocalBackend) -> tuple[list[tuple[int, int]], Any]:
    _, lm = be._model()
    calls: list[tuple[int, int]] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:  # noqa: ARG001
        ids = args[0] if args else kwargs["input_ids"]
        calls.append((int(ids.shape[0]), int(ids.shape[1])))

    return calls, lm.register_forward_pre_hook(hook, with_kwargs=True)


TEXTS = [
    ("years written as four-digit numbers", ["In 1862 the Congress passed laws.", "We build roads."]),
    ("the word tax", ["Taxes were raised.", "The army marched.", "A tax on imports."]),
    ("negations", ["We will not fail.", "Never again."]),
]


def detection_requests() -> list[ChatRequest]:
    p = load_prompt("detect")
    reqs = []
    for expl, texts in TEXTS:
        body = "\n".join(f"Text {i + 1}: {t}" for i, t in enumerate(texts))
        msgs = p.render(explanation=expl, texts=body, n=str(len(texts)))
        reqs.append(ChatRequest(messages=msgs, max_tokens=8 + 4 * len(texts)))
    return reqs


def test_shared_prefix_chat_answers_what_generate_answers(smol: LocalBackend) -> None:
    client = LLMClient(smol)
    reqs = detection_requests()
    calls, handle = forward_rows(smol)
    try:
        shared = client.chat_many(reqs)
        first = list(calls)
        calls.clear()
        again = client.chat_many(reqs[:1] + [ChatRequest(messages=(Message("user", "Say hi."),), max_tokens=4)])
        smol.shared_chat = False
        calls.clear()
        plain = [smol._chat_sync([r])[0] for r in reqs]
        plain_calls = list(calls)
    finally:
        handle.remove()
        smol.shared_chat = True
    assert all(isinstance(r, ChatResult) for r in [*shared, *plain, *again])
    assert [r.text for r in shared] == [r.text for r in plain]  # type: ignore[union-attr]
    assert [r.prompt_tokens for r in shared] == [r.prompt_tokens for r in plain]  # type: ignore[union-attr]
    # the instructions once (one row), then one pass of the three rows over their own tokens, then one token a step
    n_prefix = first[0][1]
    assert first[0][0] == 1 and first[1][0] == 3 and first[1][1] < n_prefix / 2
    assert all(rows == 3 and width == 1 for rows, width in first[2:])
    assert sum(w for r, w in plain_calls if w > 1) > 3 * n_prefix  # generate reads each whole prompt
