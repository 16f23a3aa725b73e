"""Builds the objects stages share from the config: an LLM client wired to the store's cache and usage log."""

from __future__ import annotations

from autointerp.config import LLMConfig, RunConfig
from autointerp.llm.base import BackendSpec, make_backend
from autointerp.llm.client import LLMClient, Price, RetryPolicy
from autointerp.store.engine import Store
from autointerp.store.llm_log import SqlResponseCache, SqlUsageLog


def backend_spec(c: LLMConfig) -> BackendSpec:
    return BackendSpec(
        backend=c.backend,
        model=c.model,
        base_url=c.base_url,
        api_key_env=c.api_key_env,
        concurrency=c.concurrency,
        timeout_s=c.timeout_s,
        device=c.device,
        batch_size=c.batch_size,
        options=tuple(sorted(c.options.items())),
    )


def make_client(cfg: RunConfig, store: Store | None, name: str, *, stage: str = "", cache: bool = True) -> LLMClient:
    c = cfg.llm_config(name)
    return LLMClient(
        make_backend(backend_spec(c)),
        cache=SqlResponseCache(store) if store is not None and cache else None,
        usage=SqlUsageLog(store, stage) if store is not None else None,
        retry=RetryPolicy(attempts=c.retries),
        price=Price(c.price_prompt, c.price_completion),
        concurrency=c.concurrency,
    )
