"""The response cache stays small: a simulation request names its slots (read_at), backends fill those rows only
(the candidates there), the client stores logprobs compactly (float32 values in float32's shortest decimals) and
the SQL cache compresses request and response; a rerun makes no call and reads back the same floats bit for bit,
entries written before all this still read, and an old full-row entry of a simulation no longer matches."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import select

from autointerp.llm.client import LLMClient, MemoryCache, _logprobs_from, _logprobs_to
from autointerp.llm.fake import FakeBackend, fake_client
from autointerp.llm.types import LogprobsRequest, LogprobsResult, keep_read, read_rows, request_key
from autointerp.score.simulate import DIGITS, LogprobSimulator
from autointerp.store import open_store
from autointerp.store.llm_log import PACKED, SqlResponseCache, pack, unpack
from autointerp.store.tables import LLMCacheEntry

EXPLANATION = "years written with digits"


def _float32_scorer(seed: int = 0) -> Any:
    """Like the local backend: at a slot (the text so far ends with a tab) float32 log-probabilities of the ten
    digits and of the placeholder, elsewhere of a few other tokens; the same text always gets the same numbers."""

    def next_token(text: str) -> dict[str, float]:
        rng = np.random.default_rng([seed, len(text)])
        keys = [*DIGITS, "unknown"] if text.endswith("\t") else ["unknown", "\n", " the", "0"]
        logits = rng.normal(0, 4, len(keys)).astype(np.float32)
        lp = logits - np.float32(np.log(np.exp(logits.astype(np.float64)).sum()))
        return dict(zip(keys, lp.astype(np.float32).tolist(), strict=True))

    return next_token


def _record(n: int = 63, seed: int = 0) -> list[str]:
    words = [" the", " Union", " 1", "8", "6", "2", ",", " Congress", "\n", " shall", " of", " café", "\t"]
    rng = random.Random(seed)
    return [rng.choice(words) for _ in range(n)]


def _client(cache: Any, seed: int = 0) -> tuple[LLMClient, FakeBackend]:
    """A client whose fake scores with _float32_scorer(seed), and its backend."""
    client = fake_client(next_token=_float32_scorer(seed), cache=cache)
    return client, client.backend  # type: ignore[return-value]


def test_read_rows_are_the_rows_before_the_read_offsets() -> None:
    offsets = (10, 13, 14, 21, 22, 25, 26)  # "a", "\t", "unknown", "\n", "b", "\t", "unknown"
    assert read_rows(offsets, (14, 26)) == [1, 5]  # the tabs' rows: what follows them is the digit at the slot
    assert read_rows(offsets, (10,)) == []  # the prompt's first token: its row lies in the prefix
    assert read_rows(offsets, (15,)) == []  # inside a token: nothing starts there
    rows = ({"x": -1.0, "1": -2.0}, {"1": -0.5, "y": -0.9, "2": -1.5}, {"z": 0.0})
    full = LogprobsResult(("a", "b", "c"), (0, 1, 2), rows)
    cut = keep_read(LogprobsRequest("abc", ("1", "2"), read_at=(2,)), full)
    assert cut.logprobs == ({}, {"1": -0.5, "2": -1.5}, {})  # the read row, its candidates only
    assert keep_read(LogprobsRequest("abc", ("1", "2")), full) == full  # no read_at: every row as it was


def test_the_simulator_reads_its_slots_only_and_predicts_as_with_every_row() -> None:
    record = _record(12)
    client, be = _client(None)
    sim = LogprobSimulator(client)
    (with_slots,) = sim.simulate(EXPLANATION, [record])
    (req,) = be.logprob_requests
    assert req.read_at == tuple(len(req.prefix) + s for s in sim.body(record).slots)
    assert req.payload()["read_at"] == req.read_at  # part of the request key
    (res,) = client.logprobs_many([req])
    assert isinstance(res, LogprobsResult) and len(res.tokens) > 3 * len(record)  # every token, few rows filled
    filled = [i for i, row in enumerate(res.logprobs) if row]
    assert len(filled) == len(record) and all(set(res.logprobs[i]) == set(DIGITS) for i in filled)

    class EveryRow(LogprobSimulator):
        def request(self, prefix: str, body: Any) -> LogprobsRequest:
            r = super().request(prefix, body)
            return LogprobsRequest(r.prompt, r.candidates, r.top_logprobs, prefix=r.prefix)

    (with_rows,) = EveryRow(_client(None)[0]).simulate(EXPLANATION, [record])
    assert with_slots == with_rows  # the same floats: the rows it no longer gets were never read


def _bits(res: LogprobsResult) -> bytes:
    return np.array([v for row in res.logprobs for v in row.values()], dtype=np.float64).tobytes()


def test_compact_form_reads_back_the_same_floats_bit_for_bit() -> None:
    lp32 = np.random.default_rng(1).normal(-8, 5, 40).astype(np.float32).tolist()
    rows = ({}, dict(zip(DIGITS, lp32[:10], strict=True)), {}, {"a b": lp32[10], "\n": -math.inf, "z": -0.0})
    res = LogprobsResult(("x", "\t", "unknown", "\n"), (100, 101, 102, 109), rows, 4)
    stored = _logprobs_to(res)
    reprs = " ".join(repr(v) for row in rows for v in row.values())
    assert stored["f32"] is True and len(stored["values"]) < 0.7 * len(reprs)  # 9 digits at most, not 17
    back = _logprobs_from(json.loads(json.dumps(stored)))
    assert back == res and _bits(back) == _bits(res)
    f64 = LogprobsResult(("x", "y"), (0, 1), ({"1": -0.1, "2": -2.3025850929940455}, {}), 2)  # not float32 values
    stored = _logprobs_from(json.loads(json.dumps(_logprobs_to(f64))))
    assert _logprobs_to(f64)["f32"] is False and stored == f64 and _bits(stored) == _bits(f64)
    old = {"tokens": ["x", "y"], "offsets": [0, 1], "logprobs": [{"1": -0.1}, {}], "prompt_tokens": 2}
    assert _logprobs_from(old) == LogprobsResult(("x", "y"), (0, 1), ({"1": -0.1}, {}), 2)  # written before


def test_pack_compresses_and_reads_old_uncompressed_values() -> None:
    value = {"text": "Explanation: dates \ud800 café", "n": [1, 2, 3] * 100}
    packed = pack(value)
    assert set(packed) == {PACKED} and len(json.dumps(packed)) < len(json.dumps(value)) / 3
    assert unpack(packed) == value  # a lone surrogate too
    assert unpack({"text": "old", "finish_reason": "stop"}) == {"text": "old", "finish_reason": "stop"}


@pytest.fixture()
def store(tmp_path: Path) -> Any:
    return open_store(f"sqlite:///{tmp_path / 'cache.sqlite'}")


def _entry_bytes(db: Path) -> list[int]:
    con = sqlite3.connect(db)
    sizes = [
        int(n)
        for (n,) in con.execute(
            "SELECT length(key) + length(backend) + length(model) + length(request) + length(response) "
            "+ length(created_at) FROM llm_cache"
        )
    ]
    con.close()
    return sizes


def test_simulation_rerun_from_the_sql_cache_is_free_identical_and_small(store: Any, tmp_path: Path) -> None:
    records = [_record(63, seed) for seed in range(3)]  # the demo's records: 63 tokens after BOS
    client, _ = _client(SqlResponseCache(store))
    first = LogprobSimulator(client).simulate(EXPLANATION, records)
    assert client.calls == 3 and all(isinstance(p, list) and len(p) == 63 for p in first)
    again, be = _client(SqlResponseCache(store), seed=99)  # another backend: any call would change the numbers
    assert LogprobSimulator(again).simulate(EXPLANATION, records) == first
    assert again.calls == 0 and again.cache_hits == 3 and not be.logprob_requests
    sizes = _entry_bytes(tmp_path / "cache.sqlite")
    assert len(sizes) == 3 and max(sizes) <= 8192, sizes  # every prompt token's full row took ~190 KB
    with store.session() as s:
        request = unpack(s.exec(select(LLMCacheEntry)).first().request)  # type: ignore[union-attr]
    assert request["prefix"]["chars"] > 1000 and len(request["prefix"]["sha256"]) == 64  # the shared text once
    assert request["read_at"] and request["candidates"] == list(DIGITS)


def test_entries_written_before_compression_still_read(store: Any) -> None:
    req = LogprobsRequest("a\tunknown\n", DIGITS, 20)
    key = request_key("fake", "m", req.payload())
    old = {"tokens": ["a", "\t", "unknown", "\n"], "offsets": [0, 1, 2, 9], "prompt_tokens": 4,
           "logprobs": [{"0": -0.5}, {"7": -0.1, "3": -2.5}, {}, {}]}  # fmt: skip
    with store.session() as s:  # a row as earlier versions wrote it: plain JSON, every row in full
        s.add(LLMCacheEntry(key=key, backend="fake", model="m", request=req.payload(), response=old))
        s.commit()
    client, be = _client(SqlResponseCache(store))
    (res,) = client.logprobs_many([req])
    assert client.calls == 0 and isinstance(res, LogprobsResult) and res.logprobs[1] == {"7": -0.1, "3": -2.5}
    assert "read_at" not in req.payload()  # requests without read offsets keep their keys
    # an old simulation entry (no read_at in its key) is simply not matched: the slots are a new key
    assert request_key("fake", "m", LogprobsRequest("a\tunknown\n", DIGITS, 20, read_at=(2,)).payload()) != key


def test_memory_cache_holds_the_compact_form_too() -> None:
    cache = MemoryCache()
    client, _ = _client(cache)
    out = LogprobSimulator(client).simulate(EXPLANATION, [_record(20)])
    (stored,) = cache.data.values()
    assert "rows" in stored and "logprobs" not in stored
    again, _ = _client(cache, seed=5)
    assert LogprobSimulator(again).simulate(EXPLANATION, [_record(20)]) == out and again.calls == 0
