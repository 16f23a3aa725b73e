"""Simulator: golden prompts, slot reading and alignment (scripted fake), the prefix over an OpenAI-compatible
server, and the JSON fallback's validation and single re-ask (every fault ends as a SimFailure, never a guess). On
the real SmolLM2 (one forward pass per record, prefix reuse, alignment): tests/integration/test_simulate_local.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from autointerp.llm.base import BackendSpec
from autointerp.llm.client import LLMClient, RetryPolicy
from autointerp.llm.fake import FakeBackend, fake_client
from autointerp.llm.openai_backend import OpenAIBackend
from autointerp.llm.types import (
    Capabilities,
    ChatRequest,
    ChatResult,
    LLMError,
    LogprobsRequest,
    LogprobsResult,
    PermanentLLMError,
)
from autointerp.score.simulate import (
    DIGITS,
    JsonSimulator,
    LogprobSimulator,
    SimFailure,
    SimulatorId,
    display_token,
    make_simulator,
    parse_answer,
    read_slots,
)

FAST = RetryPolicy(attempts=2, initial_s=0.001, max_s=0.002)
EXPLANATION = "the word Union"


def _lp(probs: dict[str, float]) -> dict[str, float]:
    return {k: math.log(v) for k, v in probs.items()}


# -- prompts ---------------------------------------------------------------------------------------------------


def test_logprob_prompt_golden(golden: Any) -> None:
    sim = LogprobSimulator(fake_client(retry=FAST))
    prefix = sim.prefix("the word\n Union  (in  speeches)")  # whitespace in an explanation collapses to one line
    body = sim.body([" The", " state", " of", " the", " Union", "\n", "\t", "7", "é"])
    golden("simulate_prompt.txt", prefix + body.text)
    assert prefix.endswith("Feature explanation: the word Union (in speeches)\nActivations:\n<start>\n")
    assert body.text.startswith(" The\tunknown\n state\tunknown\n")
    assert "\\n\tunknown\n\\t\tunknown\n7\tunknown\né\tunknown\n" in body.text
    assert [body.text[s : s + 7] for s in body.slots] == ["unknown"] * 9


def test_json_prompt_golden(golden: Any) -> None:
    sim = JsonSimulator(fake_client(retry=FAST))
    req = sim.request(EXPLANATION, [" The", " Union", "\n", '"', "\t7"])
    rendered = "".join(f"<|{m.role}|>\n{m.content}\n" for m in req.messages)
    golden("simulate_json_prompt.txt", rendered)
    assert req.messages[-1].content.startswith('Explanation: the word Union\nTokens (5): [" The", " Union", "\\n", ')
    assert req.max_tokens == 4 * 5 + 16  # four tokens per value, and room for the brackets


def test_display_token_spells_out_what_would_break_a_line() -> None:
    assert display_token("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert display_token("\x0b\x00\u2028x") == "\\x0b\\x00\\u2028x"
    assert display_token(" café 🙂 ") == " café 🙂 "  # leading spaces and multi-byte characters stay as they are


def test_identity_names_method_model_and_prompt() -> None:
    client = fake_client(retry=FAST)
    ident = LogprobSimulator(client).identity
    assert ident == SimulatorId("logprobs", "fake:m", "simulate", ident.prompt_hash) and len(ident.prompt_hash) == 12
    assert JsonSimulator(client).identity.method == "json"


def test_empty_explanation_is_refused() -> None:
    with pytest.raises(ValueError, match="empty explanation"):
        LogprobSimulator(fake_client(retry=FAST)).simulate("  \n", [[" a"]])


# -- logprob path on the scripted fake -------------------------------------------------------------------------


def _union_scorer(text: str) -> dict[str, float]:
    """At a slot (the text so far ends with the tab), 9 for a line whose token holds "Union", else an even split
    of 0 and 1 with some mass on a non-digit token (which the simulator drops before taking the expectation)."""
    if not text.endswith("\t"):
        return _lp({"unknown": 0.9, "0": 0.1})
    token = text[text.rindex("\n") + 1 : -1]
    if "Union" in token:
        return _lp({"9": 1.0})
    return _lp({"0": 0.25, "1": 0.25, "unknown": 0.5})


@pytest.mark.parametrize("reuse", [True, False], ids=["prefix", "full"])
def test_logprob_path_expected_values_through_the_fake(reuse: bool) -> None:
    client = fake_client(next_token=_union_scorer, retry=FAST)
    be = client.backend
    sim = LogprobSimulator(client, reuse_prefix=reuse)
    records = [[" The", " Union", "\n"], [" a", "\t", " Union", "9"], []]
    out = sim.simulate(EXPLANATION, records)
    assert out == [pytest.approx([5 / 9, 10.0, 5 / 9]), pytest.approx([5 / 9, 5 / 9, 10.0, 5 / 9]), []]
    assert len(be.logprob_requests) == 2  # one request per non-empty record
    req = be.logprob_requests[0]
    assert req.candidates == DIGITS
    if reuse:
        assert req.prefix == sim.prefix(EXPLANATION) and req.prompt == sim.body(records[0]).text
    else:
        assert req.prefix == "" and req.prompt == sim.prefix(EXPLANATION) + sim.body(records[0]).text


def test_llm_failure_on_the_logprob_path_is_a_simfailure() -> None:
    client = fake_client(next_token=lambda text: PermanentLLMError("400 context too long"), retry=FAST)
    (out,) = LogprobSimulator(client).simulate(EXPLANATION, [[" a", " b"]])
    assert isinstance(out, SimFailure) and "LLM call failed" in out.error and "context too long" in out.error


def test_slot_inside_a_simulator_token_is_a_failure_not_a_guess() -> None:
    # "\tunknown" as ONE simulator token: no token starts at the slot, so there is nothing honest to read there.
    res = LogprobsResult(("a", "\tunknown", "\n"), (0, 1, 9), (_lp({"0": 1.0}),) * 3)
    got = read_slots(res, [2], ["a"])
    assert isinstance(got, SimFailure) and "no simulator token starts at its activation slot" in got.error


def test_no_digit_among_top_k_is_a_failure() -> None:
    res = LogprobsResult(("a", "\t", "unknown"), (0, 1, 2), (_lp({"b": 1.0}), _lp({"unknown": 1.0}), {}))
    got = read_slots(res, [2], ["a"])
    assert isinstance(got, SimFailure) and "no digit" in got.error
    partial = LogprobsResult(res.tokens, res.offsets, ({}, _lp({"3": 0.2, "unknown": 0.8}), {}))
    assert read_slots(partial, [2], ["a"]) == pytest.approx([3 * 10 / 9])  # renormalized over the digits seen


def test_make_simulator_follows_the_backends_capabilities() -> None:
    class NoLogprobs(FakeBackend):
        async def capabilities(self) -> Capabilities:
            return Capabilities(chat=True, prompt_logprobs=False)

    client = fake_client(retry=FAST)
    assert isinstance(make_simulator(client), LogprobSimulator)
    assert isinstance(make_simulator(client, prefer="json"), JsonSimulator)
    plain = LLMClient(NoLogprobs(BackendSpec(backend="fake", model="m")))
    assert isinstance(make_simulator(plain), JsonSimulator)
    with pytest.raises(ValueError, match="unknown simulator"):
        make_simulator(client, prefer="guess")  # type: ignore[arg-type]


# -- prefix over an OpenAI-compatible server (mock transport) --------------------------------------------------


def test_openai_backend_sends_prefix_plus_prompt_and_returns_the_prompt_tokens() -> None:
    # the OpenAI convention (vLLM): entry i holds the alternatives OF token i; the generated token is listed last
    prefix, prompt = "Intro\n", "a\tunknown\n"
    tokens = ["Intro", "\n", "a", "\t", "unknown", "\n", "The"]
    tops = [None, {"\n": -0.1}, {"a": -1.0}, {"\t": -0.2}, {"7": -0.5, "3": -1.5}, {"\n": -0.1}, {"The": -0.3}]
    seen: list[dict[str, Any]] = []
    client = _mock_openai(_completion(prefix + prompt + "The", tokens, [0, 5, 6, 7, 8, 15, 16], tops), seen)
    (res,) = client.logprobs_many([LogprobsRequest(prompt, DIGITS, 10, prefix=prefix)])
    assert seen[0]["prompt"] == prefix + prompt and seen[0]["echo"] is True
    assert isinstance(res, LogprobsResult)
    assert res.tokens == ("a", "\t", "unknown", "\n") and res.offsets == (6, 7, 8, 15)  # counted from the prefix
    assert res.logprobs[1] == {"7": -0.5, "3": -1.5}  # what follows the tab: the slot's distribution
    plain = LogprobsRequest(prompt).payload()
    assert plain == {"kind": "logprobs", "prompt": prompt, "candidates": (), "top_logprobs": 5}  # keys unchanged
    assert LogprobsRequest(prompt, prefix=prefix).payload()["prefix"] == prefix  # the cache key covers the prefix


def test_openai_backend_returns_the_read_rows_only() -> None:
    # the server echoes every row; a request with read_at gets the rows before its read offsets, candidates only
    prefix, prompt = "Intro\n", "a\tunknown\nb\tunknown\n"
    tokens = ["Intro", "\n", "a", "\t", "unknown", "\n", "b", "\t", "unknown", "\n", "The"]
    offsets = [0, 5, 6, 7, 8, 15, 16, 17, 18, 25, 26]
    tops = [None, {"\n": -0.1}, {"a": -1.0}, {"\t": -0.2}, {"7": -0.5, "unknown": -0.9, "3": -1.5}, {"\n": -0.1},
            {"b": -0.3}, {"\t": -0.2}, {"unknown": -0.2, "2": -2.0}, {"\n": -0.1}, {"The": -0.3}]  # fmt: skip
    client = _mock_openai(_completion(prefix + prompt + "The", tokens, offsets, tops), [])
    (res,) = client.logprobs_many([LogprobsRequest(prompt, DIGITS, 20, prefix=prefix, read_at=(8, 18))])
    assert isinstance(res, LogprobsResult) and res.offsets == tuple(offsets[2:10])
    assert res.logprobs == ({}, {"7": -0.5, "3": -1.5}, {}, {}, {}, {"2": -2.0}, {}, {})
    first = (7 * math.exp(-0.5) + 3 * math.exp(-1.5)) / (math.exp(-0.5) + math.exp(-1.5))
    assert read_slots(res, [8, 18], ["a", "b"]) == pytest.approx([first * 10 / 9, 20 / 9])


def _mock_openai(body: dict[str, Any], seen: list[dict[str, Any]]) -> LLMClient:
    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return httpx2.Response(200, json=body)

    spec = BackendSpec(backend="openai", model="m", base_url="http://127.0.0.1:9/v1")
    be = OpenAIBackend(spec, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    return LLMClient(be, retry=FAST)


def _completion(text: str, tokens: list[str], offsets: list[int], tops: list[Any]) -> dict[str, Any]:
    logprobs = {"tokens": tokens, "text_offset": offsets, "token_logprobs": [None] * len(tokens), "top_logprobs": tops}
    choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": logprobs}
    return {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}


def test_openai_backend_reads_llama_cpp_python_layout() -> None:
    # As llama-cpp-python's server answers (recorded from the shipped SmolLM2 GGUF): the prompt tokens only, entry i
    # is the distribution AFTER token i (entry 0 nulled), and the greedy generated " " tops the last entry.
    prompt = "Value: 3\nValue:"
    tokens = ["Value", ":", " ", "3", "\n", "Value", ":"]
    tops = [
        None,
        {" ": -0.38, ":": -10.8},
        {"1": -0.9, "3": -1.6, " ": -10.2},
        {".": -1.5, "\n": -1.8, "3": -3.4},
        {"Value": -0.3, "\n": -2.0},
        {":": -0.05, "Value": -7.6},
        {" ": -0.04, " -": -4.8, ":": -13.7},
    ]
    body = _completion(prompt + " ", tokens, [0, 5, 6, 7, 8, 9, 14], tops)
    (res,) = _mock_openai(body, []).logprobs_many([LogprobsRequest(prompt, ("1", "3"), 3)])
    assert isinstance(res, LogprobsResult) and res.tokens == tuple(tokens)
    assert res.logprobs[0] == {} and res.logprobs[2] == tops[2]  # after "Value: " come the digits
    assert list(res.logprobs[1:]) == tops[1:]
    with_prefix = LogprobsRequest("Value:", ("1", "3"), 3, prefix="Value: 3\n")
    (res,) = _mock_openai(body, []).logprobs_many([with_prefix])
    assert isinstance(res, LogprobsResult) and res.tokens == ("Value", ":") and res.offsets == (9, 14)
    assert res.logprobs == (tops[5], tops[6])


# -- JSON fallback ---------------------------------------------------------------------------------------------


def _scripted(*answers: str | LLMError) -> Callable[[ChatRequest], Any]:
    queue = list(answers)
    return lambda req: queue.pop(0)


def test_parse_answer_accepts_a_list_inside_prose_and_fences() -> None:
    assert parse_answer("```json\n[0, 2.5, 10]\n```", 3) == [0.0, 2.5, 10.0]
    assert parse_answer("Here you go: [1,0] as asked.", 2) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        ("[0, 1]", "2 numbers for 3 tokens"),
        ("[0, 10.14, 1]", "less than or equal to 10"),
        ("[0, -1, 1]", "greater than or equal to 0"),
        ('[0, "5", 1]', "valid number"),
        ("[0, true, 1]", "valid number"),
        ("[0, NaN, 1]", "less than or equal to 10"),
        ("[0, 1, 2", "no JSON list"),
        ("[0, 1,, 2]", "not valid JSON"),
        ("I cannot tell.", "no JSON list"),
    ],
    ids=["short", "above-10", "negative", "string", "bool", "nan", "truncated", "bad-json", "prose"],
)
def test_parse_answer_refuses(answer: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_answer(answer, 3)


def test_json_valid_answer_needs_one_call() -> None:
    client = fake_client(responder=_scripted("[0, 9, 1.5]"), retry=FAST)
    be = client.backend
    assert JsonSimulator(client).simulate(EXPLANATION, [[" The", " Union", " is"]]) == [[0.0, 9.0, 1.5]]
    assert len(be.requests) == 1


def test_json_reask_once_with_the_error_then_valid() -> None:
    client = fake_client(responder=_scripted("[0, 9]", "[0, 9, 0]"), retry=FAST)
    be = client.backend
    assert JsonSimulator(client).simulate(EXPLANATION, [[" The", " Union", " is"]]) == [[0.0, 9.0, 0.0]]
    first, second = be.requests
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[-2].role == "assistant" and second.messages[-2].content == "[0, 9]"
    assert second.messages[-1].role == "user" and "2 numbers for 3 tokens" in second.messages[-1].content
    assert "exactly 3 numbers" in second.messages[-1].content


@pytest.mark.parametrize(
    ("answers", "fragment"),
    [
        (("[0, 1]", "[0, 1]"), "2 numbers for 3 tokens"),  # length mismatch: never padded
        (("[0, 10.14, 1]", "[0, 10.14, 1]"), "less than or equal to 10"),  # out of range: never clipped
        (("nothing", "[0, 1, 2, 3]"), "4 numbers for 3 tokens"),
    ],
    ids=["length", "out-of-range", "then-too-long"],
)
def test_json_still_invalid_after_the_reask_is_a_failure_with_the_raw_answer(
    answers: tuple[str, str], fragment: str
) -> None:
    client = fake_client(responder=_scripted(*answers), retry=FAST)
    be = client.backend
    (out,) = JsonSimulator(client).simulate(EXPLANATION, [[" The", " Union", " is"]])
    assert isinstance(out, SimFailure) and fragment in out.error and "after one re-ask" in out.error
    assert out.raw == answers[1] and len(be.requests) == 2  # re-asked exactly once


def test_json_llm_failures_are_simfailures() -> None:
    # first record: the call itself fails (no re-ask); second: valid; third: the re-ask's call fails
    def answer(req: ChatRequest) -> Any:
        last = req.messages[-1].content
        if '"x"' in last:
            return PermanentLLMError("401 unauthorized")
        if "invalid" in last:
            return PermanentLLMError("400 context too long")
        return "[1]" if '"y"' in last else "[1, 2, 3]"

    client = fake_client(responder=answer, retry=FAST)
    be = client.backend
    out = JsonSimulator(client).simulate(EXPLANATION, [["x"], ["y"], ["z"], []])
    assert isinstance(out[0], SimFailure) and "401" in out[0].error and out[0].raw is None
    assert out[1] == [1.0]
    assert isinstance(out[2], SimFailure) and "400" in out[2].error
    assert out[3] == []  # an empty record asks nothing
    assert len(be.requests) == 4


def test_json_answers_come_through_the_chat_result() -> None:
    client = fake_client(responder=lambda req: ChatResult("[3, 4]", "stop", 10, 5), retry=FAST)
    assert JsonSimulator(client).simulate(EXPLANATION, [["a", "b"]]) == [[3.0, 4.0]]


# -- the real SmolLM2 ------------------------------------------------------------------------------------------
