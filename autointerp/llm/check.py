"""`autointerp llm check`: one uncached round trip to a configured LLM, and whether it serves prompt logprobs."""

from __future__ import annotations

import time
from typing import Any

from autointerp.config import RunConfig
from autointerp.llm.client import client_for
from autointerp.llm.types import ChatRequest, Message


def check_llm(cfg: RunConfig, name: str) -> dict[str, Any]:
    c = cfg.llm_config(name)
    client = client_for(c)
    t0 = time.perf_counter()
    res = client.chat(ChatRequest(messages=(Message("user", "Reply with the single word: ready"),), max_tokens=8))
    latency = time.perf_counter() - t0
    caps = client.capabilities()
    return {
        "llm": name,
        "backend": c.backend,
        "model": c.model,
        "base_url": c.base_url or " ".join(c.base_urls or ()),
        "latency_s": round(latency, 3),
        "answer": res.text.strip(),
        "prompt_logprobs": caps.prompt_logprobs,
        "note": caps.note,
    }
