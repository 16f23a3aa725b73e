"""Fixtures of the real-server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def llama_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python[server], installed by `make test`) serving the shipped
    SmolLM2 GGUF on 127.0.0.1, started once for every test that needs it."""
    from autointerp.llm.llamacpp import ServerError, llama_server
    from autointerp.subject.files import _smollm2_gguf

    log = tmp_path_factory.mktemp("llama") / "server.log"
    try:
        with llama_server(_smollm2_gguf(), log=log) as url:
            yield url
    except ServerError as exc:  # not installed or did not start: a failure, not a skip
        pytest.fail(str(exc))
