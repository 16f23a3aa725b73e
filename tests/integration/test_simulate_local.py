"""The simulator on the real SmolLM2 through the local backend: exactly one forward pass per record, shared-prefix
reuse equal to full re-encoding, the language-model head at the slots only, the shared instructions' cache reused
by a new explanation, alignment on tricky tokens, the model loaded once by concurrent first requests."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autointerp.llm.base import BackendSpec, make_backend
from autointerp.llm.client import LLMClient
from autointerp.llm.local import LocalBackend
from autointerp.llm.types import (
    LogprobsResult,
)
from autointerp.prompts import Prompt, load_prompt
from autointerp.score.simulate import (
    DIGITS,
    LogprobSimulator,
    read_slots,
)

EXPLANATION = "the word Union"


# Subject tokens that do not map one-to-one onto the simulator's tokens: newline, tab, a tab run, multi-byte
# characters (one split into an empty piece + the completing piece, as autointerp.subject.tokens decodes them),
# tokens that are digits, a whitespace-only token, leading spaces, the placeholder word itself, a control char.
TRICKY = (
    " The",
    " Union",
    "\n",
    "\t",
    "\t\t",
    " caf",
    "é",
    "",
    "🙂",
    " 1",
    "10",
    "7",
    " ",
    "  indeed",
    "unknown",
    "\x0b",
    "\\n",
    ".",
)


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> Iterator[LocalBackend]:
    be = make_backend(BackendSpec(backend="local", model="smollm2-135m-instruct"))
    assert isinstance(be, LocalBackend) and smol_dir.exists()
    yield be


@pytest.fixture()
def forward_calls(smol: LocalBackend) -> Iterator[list[tuple[int, int]]]:
    """Every call of the language model's forward (its top-level module): (rows, tokens per row) it read."""
    _, lm = smol._model()
    calls: list[tuple[int, int]] = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        calls.append((int(ids.shape[0]), int(ids.shape[1])))

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


RECORDS = [
    [" The", " state", " of", " the", " Union", " is", " strong", "."],
    [" In", " ", "1", "8", "6", "2", " the", " Union", " army", "\n", "\n", "We"],
    [" our", " nation", "'s", " caf", "é", " owners", "\t", "pay", " 12", " per", " cent"],
]


def _short_prompt() -> Prompt:
    """The simulator prompt with 20 lines of its first few-shot block: a short prefix keeps real-model tests fast."""
    p = load_prompt("simulate")
    explanation, lines = p.shots[0]
    return dataclasses.replace(p, shots=((explanation, "\n".join(lines.splitlines()[:20]) + "\n"),))


@pytest.mark.slow
def test_one_forward_pass_per_record_and_prefix_reuse_matches_full_encoding(
    smol: LocalBackend, forward_calls: list[tuple[int, int]]
) -> None:
    client = LLMClient(smol)
    sim = LogprobSimulator(client, _short_prompt())
    prefix_len = len(smol._model()[0].encode(sim.prefix(EXPLANATION)))
    smol._prefixes.clear()
    reused = sim.simulate(EXPLANATION, RECORDS)
    # the prefix once (for its key/value cache), then ONE pass in which every record is one row, over that
    # record's lines only: no generation, no record read twice
    assert forward_calls == [(1, prefix_len), (len(RECORDS), forward_calls[1][1])]
    assert forward_calls[1][1] < prefix_len / 3
    forward_calls.clear()
    for a, b in zip(sim.simulate(EXPLANATION, RECORDS[:2]), reused[:2], strict=True):  # the prefix is kept
        assert a == pytest.approx(b, abs=1e-4)
    assert [rows for rows, _ in forward_calls] == [2]
    forward_calls.clear()
    one_by_one = [sim.simulate(EXPLANATION, [r])[0] for r in RECORDS]  # batch rows equal single-row passes
    assert [rows for rows, _ in forward_calls] == [1] * len(RECORDS)
    forward_calls.clear()
    full = LogprobSimulator(client, _short_prompt(), reuse_prefix=False).simulate(EXPLANATION, RECORDS)
    assert forward_calls[0][0] == len(RECORDS) and forward_calls[0][1] > prefix_len  # one full row per record
    for a, b, c, rec in zip(reused, full, one_by_one, RECORDS, strict=True):
        assert isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == len(rec)
        assert a == pytest.approx(b, abs=1e-3) and a == pytest.approx(c, abs=1e-4)
        assert all(0.0 <= v <= 10.0 for v in a)
    # a sanity check of the reading rather than of the small model's skill: "Union" is above the record's mean
    first = reused[0]
    assert isinstance(first, list) and first[4] > sum(first) / len(first)


@pytest.mark.slow
def test_local_backend_runs_the_lm_head_at_the_slots_only(smol: LocalBackend) -> None:
    _, lm = smol._model()
    head_rows: list[int] = []

    def count(module: Any, args: tuple[Any, ...], out: Any) -> None:
        head_rows.append(int(out.shape[0] * out.shape[1]))  # positions the LM head ran at

    client = LLMClient(smol)
    sim = LogprobSimulator(client, _short_prompt())
    prefix = sim.prefix(EXPLANATION)
    body = sim.body(RECORDS[1])
    slots = sim.request(prefix, body)
    assert slots.read_at
    every = dataclasses.replace(slots, read_at=())
    sim.client.logprobs_many([every])  # the prefix's cache, outside the count
    handle = lm.get_output_embeddings().register_forward_hook(count)
    try:
        (cut,) = client.logprobs_many([slots])
        (full,) = client.logprobs_many([every])
    finally:
        handle.remove()
    assert isinstance(cut, LogprobsResult) and isinstance(full, LogprobsResult)
    assert head_rows == [len(RECORDS[1]), len(full.tokens)]  # one position per slot, not one per prompt token
    assert cut.tokens == full.tokens and cut.offsets == full.offsets
    filled = [i for i, row in enumerate(cut.logprobs) if row]
    assert len(filled) == len(RECORDS[1])
    for i, (a, b) in enumerate(zip(cut.logprobs, full.logprobs, strict=True)):
        if i in filled:
            assert set(a) == set(DIGITS) and all(a[d] == pytest.approx(b[d], abs=1e-4) for d in DIGITS)
        else:
            assert a == {}
    assert read_slots(cut, [len(prefix) + s for s in body.slots], RECORDS[1]) == pytest.approx(
        read_slots(full, [len(prefix) + s for s in body.slots], RECORDS[1]), abs=1e-4
    )


@pytest.mark.slow
def test_a_new_explanation_reuses_the_cache_of_the_shared_instructions(
    smol: LocalBackend, forward_calls: list[tuple[int, int]]
) -> None:
    tok = smol._model()[0]
    sim = LogprobSimulator(LLMClient(smol), _short_prompt())
    smol._prefixes.clear()
    sim.simulate(EXPLANATION, RECORDS[:1])
    forward_calls.clear()
    other = "years and other numbers written with digits"
    reused = sim.simulate(other, RECORDS)
    prefix_len = len(tok.encode(sim.prefix(other)))
    header = len(tok.encode("Feature explanation: " + other + "\nActivations:\n<start>\n"))
    # the new prefix pass runs from where the two prefixes part, inside the explanation's header
    assert forward_calls[0][0] == 1 and forward_calls[0][1] <= header < prefix_len / 4
    smol._prefixes.clear()
    forward_calls.clear()
    fresh = sim.simulate(other, RECORDS)
    assert forward_calls[0] == (1, prefix_len)
    for a, b in zip(reused, fresh, strict=True):
        assert isinstance(a, list) and isinstance(b, list) and a == pytest.approx(b, abs=1e-4)


@pytest.mark.slow
def test_alignment_on_tricky_tokens_with_the_real_tokenizer(
    smol: LocalBackend, forward_calls: list[tuple[int, int]]
) -> None:
    client = LLMClient(smol)
    sim = LogprobSimulator(client, _short_prompt())
    prefix = sim.prefix(EXPLANATION)
    for record in (list(TRICKY), ["  two spaces first", "\n"]):  # the second tests the prefix/body boundary
        body = sim.body(record)
        (res,) = client.logprobs_many([sim.request(prefix, body)])
        assert isinstance(res, LogprobsResult)
        starts = {o: i for i, o in reversed(list(enumerate(res.offsets)))}  # first simulator token at each offset
        at = [starts[len(prefix) + slot] for slot in body.slots]
        for k, j in enumerate(at):
            assert res.tokens[j] == "unknown" and res.tokens[j - 1] == "\t", (k, record[k])
            assert set(DIGITS) <= set(res.logprobs[j - 1])  # every digit candidate is read at the slot
        if len(record) > 2:  # lines take 3 to 5+ simulator tokens: no fixed token-count mapping would align them
            assert len({b - a for a, b in zip(at, at[1:], strict=False)}) >= 3
        got = read_slots(res, [len(prefix) + s for s in body.slots], record)
        assert isinstance(got, list) and len(got) == len(record) and all(0 <= v <= 10 for v in got)
    assert len(forward_calls) <= 3  # at most the prefix + one pass per record


@pytest.mark.slow
def test_concurrent_first_requests_load_the_local_model_once(smol_dir: Path) -> None:
    # The simulator's first batch reaches a fresh backend from several threads at once; loading the model in each
    # (transformers' lazy imports and meta-device initialization are not thread-safe) failed before the load lock.
    code = (
        "from autointerp.llm.base import BackendSpec, make_backend\n"
        "from autointerp.llm.client import LLMClient\n"
        "from autointerp.llm.types import LogprobsRequest\n"
        "c = LLMClient(make_backend(BackendSpec(backend='local', model='smollm2-135m-instruct', batch_size=4)))\n"
        "print(*[type(r).__name__ for r in c.logprobs_many([LogprobsRequest(f'a {i}') for i in range(3)])])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert smol_dir.exists() and out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["LogprobsResult"] * 3
