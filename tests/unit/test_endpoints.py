"""Several OpenAI-compatible servers behind one [llm.NAME] block (base_urls): real HTTP on 127.0.0.1 against the
stub server; one server stops answering halfway (dropped connections, or no answer past the timeout), and every
request is still answered exactly once, spread over the servers, with nothing asked twice on a rerun."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from autointerp.config import ConfigError, LLMConfig, load_config
from autointerp.llm.client import MemoryCache, MemoryUsage, client_for
from autointerp.llm.endpoints import EndpointPool
from autointerp.llm.stub_server import StubServer
from autointerp.llm.types import ChatRequest, ChatResult, Message

N = 36


def _reqs(n: int = N) -> list[ChatRequest]:
    return [ChatRequest(messages=(Message("user", f"feature {i}"),), max_tokens=8) for i in range(n)]


@pytest.mark.parametrize("fail", ["close", "hang"])
def test_a_server_that_stops_answering_has_its_requests_go_to_the_others(fail: Any) -> None:
    with ExitStack() as stack:
        dying = stack.enter_context(StubServer(latency_s=0.01, answers=4, fail=fail))
        live = [stack.enter_context(StubServer(latency_s=0.01)) for _ in range(2)]
        servers = [dying, *live]
        cfg = LLMConfig(backend="openai", model="m", base_urls=[s.url for s in servers], concurrency=2,
                        timeout_s=0.5, retries=2)  # fmt: skip
        cache, usage = MemoryCache(), MemoryUsage()
        client = client_for(cfg, cache=cache, usage=usage)
        assert client.concurrency == 6 and isinstance(client.backend, EndpointPool)
        out = client.chat_many(_reqs())
        assert all(isinstance(r, ChatResult) for r in out), [r for r in out if not isinstance(r, ChatResult)]
        assert [r.text for r in out if isinstance(r, ChatResult)] == [f"Explanation: feature {i}" for i in range(N)]
        answered = Counter(t for s in servers for t in s.answered)
        assert sorted(answered) == sorted(f"feature {i}" for i in range(N)) and set(answered.values()) == {1}
        assert len(dying.answered) == 4 and dying.received > 4  # it died with work in hand, which went elsewhere
        assert all(len(s.answered) >= 8 for s in live)
        assert client.calls == N and [u.status for u in usage.rows] == ["ok"] * N  # failover is not a retry
        by_url = Counter(r.endpoint for r in out if isinstance(r, ChatResult))
        assert by_url == {s.url: len(s.answered) for s in servers}
        assert len(cache.data) == N
        # a rerun asks nothing: the answers are cached whichever server gave them
        again = client_for(cfg, cache=cache, usage=usage)
        assert again.chat_many(_reqs()) == out and again.calls == 0 and again.cache_hits == N
        assert sum(len(s.answered) for s in servers) == N


def test_the_cache_names_the_server_that_answered() -> None:
    seen: list[dict[str, Any]] = []

    class Recording(MemoryCache):
        def put(self, key: str, backend: str, model: str, request: dict[str, Any], response: dict[str, Any]) -> None:
            seen.append({"backend": backend, "model": model, **request, "response": response})
            super().put(key, backend, model, request, response)

    with StubServer() as a, StubServer() as b:
        client = client_for(LLMConfig(backend="openai", model="m", base_urls=[a.url, b.url]), cache=Recording())
        client.chat_many(_reqs(6))
    assert {s["endpoint"] for s in seen} == {a.url, b.url}
    assert all(s["backend"] == "openai" and s["model"] == "m" and "endpoint" not in s["response"] for s in seen)


def test_all_servers_down_is_a_failure_not_a_stall() -> None:
    with StubServer(answers=0) as a, StubServer(answers=0) as b:
        cfg = LLMConfig(backend="openai", model="m", base_urls=[a.url, b.url], retries=2, timeout_s=0.5)
        client = client_for(cfg)
        client.retry = type(client.retry)(attempts=2, initial_s=0.01, max_s=0.02)
        out = client.chat_many(_reqs(3))
    assert all(not isinstance(r, ChatResult) and "UnreachableError" in r.error for r in out)


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('base_urls = ["not a url"]', "base_urls"),
        ('base_urls = ["ftp://h1/v1"]', "base_urls"),
        ('base_urls = ["http://:8000/v1"]', "base_urls"),
        ('base_urls = ["http://h1:port/v1"]', "base_urls"),
        ("base_urls = []", "base_urls.*at least one"),
        ('base_urls = ["http://h1/v1", "http://h1/v1"]', "base_urls.*once"),
        ('base_urls = ["http://h1/v1"]\nbase_url = "http://h2/v1"', "no base_url"),
        ('base_urls = "http://h1/v1"', "base_urls"),
    ],
)
def test_a_wrong_base_urls_is_refused_naming_it(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f'[llm.farm]\nbackend = "openai"\nmodel = "m"\n{toml}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(p)
    assert "llm.farm" in str(info.value)


def test_base_urls_needs_the_openai_backend(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[llm.farm]\nbackend = "local"\nbase_urls = ["http://h1:8000/v1"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="base_urls needs backend"):
        load_config(p)


def test_good_base_urls_load() -> None:
    urls = ["http://h1:8000/v1", "https://h2.example.org/v1", "http://[::1]:8000/v1"]
    cfg = LLMConfig(backend="openai", model="m", base_urls=urls[:2], concurrency=3)
    assert LLMConfig(backend="openai", base_urls=urls).base_urls == urls
    assert client_for(cfg).concurrency == 6


def test_the_explain_stage_finishes_when_a_server_dies_halfway(collected_db: str) -> None:
    import hashlib
    import json
    import sqlite3

    from autointerp.explain.run import run_explain
    from autointerp.store import open_store
    from autointerp.store.llm_log import unpack

    def reply(text: str) -> str:
        return "tokens of kind " + hashlib.sha256(text.encode()).hexdigest()[:8]

    with ExitStack() as stack:
        dying = stack.enter_context(StubServer(answers=2, fail="close", reply=reply))
        servers = [dying, *(stack.enter_context(StubServer(reply=reply)) for _ in range(2))]
        over = {"db": collected_db, "explain.limit": 12, "explain.min_examples": 1, "explain.features": "all",
                "explain.chunk": 4, "explain.llm": "farm",
                "llm": {"farm": {"backend": "openai", "model": "m", "base_urls": [s.url for s in servers],
                                 "concurrency": 1, "timeout_s": 2.0, "retries": 2}}}  # fmt: skip
        cfg = load_config(None, over)
        res = run_explain(cfg, open_store(cfg.db))
    assert res.counts == {"ok": 12} and res.llm_calls == 12
    assert sum(len(s.answered) for s in servers) == 12 and len(dying.answered) == 2 and dying.received > 2
    assert all(len(s.answered) >= 2 for s in servers)
    con = sqlite3.connect(collected_db.split("///", 1)[1])
    ok = "select count(*), count(distinct feature_id) from explanation where status = 'ok'"
    assert con.execute(ok).fetchone() == (12, 12)
    rows = [unpack(json.loads(r)) for (r,) in con.execute("select request from llm_cache")]
    con.close()
    # the database's cache names the server of each answer
    assert Counter(r["endpoint"] for r in rows) == {s.url: len(s.answered) for s in servers}
