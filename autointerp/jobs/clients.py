"""LLM clients of the stages, wired to the store's response cache and usage log."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autointerp.config import RunConfig
    from autointerp.llm.client import LLMClient
    from autointerp.store.engine import Store


def make_client(cfg: RunConfig, store: Store | None, name: str, *, stage: str = "", cache: bool = True) -> LLMClient:
    """The client of the [llm.NAME] block, wired to the store's response cache and usage log."""
    from autointerp.llm.client import client_for
    from autointerp.store.llm_log import SqlResponseCache, SqlUsageLog

    return client_for(
        cfg.llm_config(name),
        cache=SqlResponseCache(store) if store is not None and cache else None,
        usage=SqlUsageLog(store, stage) if store is not None else None,
    )
