"""Every parser of an LLM answer, given any string, returns a parsed answer or raises its own recorded failure, never
another exception: the explanation parser, the detection / fuzzing list parser, the judge parser, the JSON
simulator's parser, and the JSON simulator itself on a raw answer (re-asked once, then a SimFailure)."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autointerp.explain.explainers import ExplanationParseError, parse_explanation
from autointerp.intervene.judge import parse_judgement
from autointerp.llm.fake import FakeBackend, fake_client
from autointerp.llm.types import ChatRequest
from autointerp.score.scorers import parse_binary_list
from autointerp.score.simulate import AnswerError, JsonSimulator, SimFailure, parse_answer

FUZZ = settings(max_examples=400, deadline=None)

# Any code point: lone surrogates and control characters included (a server's JSON escapes can put them in a str).
anything = st.text(st.characters(exclude_categories=()))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12,
).map(lambda v: json.dumps(v, allow_nan=True))
# Pieces answers are made of, so that the fuzzer reaches past the first check of each parser: labels, brackets,
# letters, numbers out of range or too long to convert, JSON nested deeper than the decoder's recursion limit.
WORDS = ["Explanation:", "Answer:", "A", "B", "tie", "both", "neither", "NaN", "Infinity", "1e999", "-1", "10.5"]
WORDS += ["[", "]", "{", "}", ",", "<<", ">>", ".", "*", "0", "1", "5"]
PHRASES = ["explanation :", "Text ", "Example 1:", "The marked tokens have in common that", "```json\n"]
ODD = [" ", "\n", "\t", '"', "\ud800", "\x00", "\u2028", "\x85"]  # separators, a lone surrogate, line breaks
pieces = st.one_of(
    st.sampled_from(WORDS + PHRASES + ODD),
    st.integers(-20, 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(4000, 5000).map(lambda k: "[" + "7" * k + "]"),
    st.integers(1, 3000).map(lambda d: "[" + '{"a":' * d + "1" + "}" * d + "]"),
    json_values,
    anything,
)
answers = st.one_of(anything, st.lists(pieces, max_size=12).map("".join))

DIGIT_LIMIT = "[" + "9" * 4400 + "]"  # past CPython's int-conversion limit: ValueError, not JSONDecodeError
DEEP = "[" + '{"a":' * 2000 + "1" + "}" * 2000 + "]"  # RecursionError in the JSON decoder


@FUZZ
@given(raw=answers, finish=st.sampled_from(["stop", "length", "content_filter", ""]))
def test_explanation_parser_returns_a_phrase_or_its_own_error(raw: str, finish: str) -> None:
    try:
        phrase = parse_explanation(raw, finish)
    except ExplanationParseError:
        return
    assert 3 <= len(phrase) <= 200 and re.search(r"[A-Za-z0-9]", phrase)
    assert phrase == phrase.strip() and "\n" not in phrase and "<<" not in phrase


@FUZZ
@given(raw=answers, n=st.integers(0, 12))
@example(raw=DIGIT_LIMIT + " [1, 0]", n=2)
def test_binary_list_parser_returns_n_flags_or_its_own_error(raw: str, n: int) -> None:
    try:
        flags = parse_binary_list(raw, n)
    except ValueError as exc:
        assert str(exc).startswith(f"expected a JSON list of {n} zeros and ones")
        return
    assert len(flags) == n and all(isinstance(f, bool) for f in flags)


def test_binary_list_parser_skips_a_list_it_cannot_convert() -> None:
    assert parse_binary_list(DIGIT_LIMIT + " [1, 0]", 2) == [True, False]


@FUZZ
@given(raw=answers)
def test_judge_parser_returns_a_choice_or_none(raw: str) -> None:
    assert parse_judgement(raw) in ("A", "B", "tie", None)


@FUZZ
@given(raw=answers, n=st.integers(0, 12))
@example(raw=DIGIT_LIMIT, n=1)
@example(raw=DEEP, n=1)
def test_json_answer_parser_returns_n_values_or_its_own_error(raw: str, n: int) -> None:
    try:
        values = parse_answer(raw, n)
    except AnswerError as exc:
        assert str(exc)
        return
    assert len(values) == n and all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 10 for v in values)


@pytest.mark.parametrize(("raw", "fragment"), [(DIGIT_LIMIT, "not valid JSON"), (DEEP, "not valid JSON")])
def test_json_answer_parser_refuses_what_the_decoder_cannot_read(raw: str, fragment: str) -> None:
    with pytest.raises(AnswerError, match=fragment):
        parse_answer(raw, 1)


def _simulator(first: str, second: str) -> tuple[JsonSimulator, FakeBackend]:
    queue = [first, second]
    client = fake_client(lambda _req: queue.pop(0))
    return JsonSimulator(client), client.backend  # type: ignore[return-value]


@FUZZ
@given(first=answers, second=answers, n=st.integers(1, 6))
@example(first="\ud800", second="[0]", n=1)  # the invalid answer travels back in the re-ask
@example(first=DEEP, second=DIGIT_LIMIT, n=1)
def test_json_simulator_returns_a_prediction_or_a_simfailure(first: str, second: str, n: int) -> None:
    sim, be = _simulator(first, second)
    (out,) = sim.simulate("the word Union", [[f" t{i}" for i in range(n)]])
    if isinstance(out, SimFailure):
        assert "after one re-ask" in out.error and out.raw == second and len(be.requests) == 2
        return
    assert len(out) == n and all(0 <= v <= 10 for v in out)
    assert len(be.requests) in (1, 2)


def test_the_reask_of_an_answer_with_a_lone_surrogate_is_sent() -> None:
    sim, be = _simulator("[\ud800 oops", "[3]")
    assert sim.simulate("the word Union", [[" Union"]]) == [[3.0]]
    reask: ChatRequest = be.requests[1]
    assert reask.messages[-2].role == "assistant" and reask.messages[-2].content == "[? oops"
