"""Detection, fuzzing and embedding scorers with scripted LLMs: labels, batching, failures left out (never "no"),
golden prompts; the score stage end to end on a collected database (rows, idempotent rerun, listing by score)."""

from __future__ import annotations

import random
import re
import sqlite3
from typing import Any

import numpy as np
import pytest

from autointerp.config import ScoreConfig, load_config
from autointerp.llm.base import BackendSpec
from autointerp.llm.client import LLMClient, RetryPolicy
from autointerp.llm.fake import FakeBackend
from autointerp.llm.types import ChatRequest, PermanentLLMError
from autointerp.prompts import load_prompt
from autointerp.records import Example, marked
from autointerp.score.scorers import DetectionScorer, EmbeddingScorer, EvalSet, FuzzingScorer, fuzzed, parse_binary_list
from autointerp.store import open_store
from autointerp.store.queries import list_features
from tests.unit.test_explain import _golden


def _ts() -> EvalSet:
    def ex(words: str, hot: set[int], role: str) -> Example:
        toks = tuple(" " + w for w in words.split())
        acts = tuple(3.0 if i in hot else 0.0 for i in range(len(toks)))
        return Example(toks, acts, role, max(acts), len(words))

    recs = (
        ex("In 1862 the Congress met", {1}, "top"),
        ex("The year 1999 was good", {2}, "top"),
        ex("By 1901 the railroads grew", {1}, "quantile"),
        ex("We will build new roads", set(), "random"),
        ex("Our farmers feed the nation", set(), "random"),
        ex("Peace and honest friendship", set(), "random"),
    )
    return EvalSet(1, 1, "years written as four-digit numbers", 3.0, recs)


def _client(responder: Any) -> LLMClient:
    return LLMClient(FakeBackend(BackendSpec(backend="fake", model="judge"), responder), retry=RetryPolicy(1, 0, 0))


def _oracle(req: ChatRequest) -> str:
    """Answers 1 for texts with a four-digit number (detection) or whose marks are on one (fuzzing)."""
    texts = re.findall(r"^Text \d+: (.*)$", req.messages[-1].content, re.M)
    if "<<" in req.messages[-1].content:
        return str([int(bool(re.search(r"<<\d{4}>>", t))) for t in texts])
    return str([int(bool(re.search(r"\d{4}", t))) for t in texts])


def test_parse_binary_list() -> None:
    assert parse_binary_list("[1, 0, 1]", 3) == [True, False, True]
    assert parse_binary_list("Sure: [0,1]\n", 2) == [False, True]
    for bad in ("[1, 0]", "yes", "[1, 2, 0]", ""):
        with pytest.raises(ValueError, match="JSON list of 3"):
            parse_binary_list(bad, 3)


def test_detection_perfect_judge_and_labels() -> None:
    sc = DetectionScorer(ScoreConfig(batch=4), _client(_oracle), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.status == "ok" and out.value == 1.0 and out.n == 6 and out.n_failed == 0
    assert out.ci_low is not None and out.ci_low < 1.0  # six items cannot make certainty


def test_failed_calls_are_left_out_not_counted_as_no() -> None:
    calls = {"n": 0}

    def flaky(req: ChatRequest) -> Any:
        calls["n"] += 1
        return PermanentLLMError("refused") if calls["n"] == 1 else _oracle(req)

    sc = DetectionScorer(ScoreConfig(batch=3), _client(flaky), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.n_failed == 3 and out.n == 3 and out.value in (1.0, None)
    assert any("LLM call failed" in e for e in out.details["errors"])


def test_every_call_failing_is_a_failed_score_not_a_zero() -> None:
    sc = DetectionScorer(ScoreConfig(), _client(lambda r: "I am not sure."), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.status == "failed" and out.value is None and "JSON list" in (out.reason or "")


def test_always_yes_is_chance() -> None:
    sc = DetectionScorer(ScoreConfig(batch=2), _client(lambda r: "[1, 1]"), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.value == 0.5


def test_fuzzing_marks_and_perfect_judge() -> None:
    ts = _ts()
    rng = random.Random(0)
    for r in ts.positives():
        text = fuzzed(r, rng)
        assert text.count("<<") == sum(marked(r.acts))
        assert not re.search(r"<<\d{4}>>", text)
    sc = FuzzingScorer(ScoreConfig(batch=3), _client(_oracle), load_prompt("fuzz"))
    (out,) = sc.score([ts])
    assert out.value == 1.0 and out.n == 6  # 3 correctly marked + 3 fuzzed versions of the positives


def test_negatives_exclude_random_contexts_that_activate() -> None:
    ts = _ts()
    hot = Example((" In", " 1776"), (0.0, 5.0), "random", 5.0)
    ts2 = EvalSet(1, 1, ts.explanation, ts.max_act, (*ts.records, hot))
    neg, excluded = ts2.negatives()
    assert excluded == 1 and hot not in neg and len(neg) == 3


def test_dense_feature_threshold_is_the_typical_random_context() -> None:
    # an MLP-neuron-like feature: every random context reaches 1/10 of the maximum somewhere
    def ex(peak: float, role: str) -> Example:
        return Example((" a", " b"), (peak / 2, peak), role, peak)

    rand = [ex(p, "random") for p in (2.0, 3.0, 4.0, 6.0, 8.0)]
    top = [ex(10.0, "top"), ex(9.0, "top"), ex(3.5, "quantile")]
    ts = EvalSet(1, 1, "x", 10.0, (*top, *rand))
    assert ts.threshold == 4.0  # the lower median of the random maxima, above 0.1 x max
    neg, excluded = ts.negatives()
    assert [r.max_act for r in neg] == [2.0, 3.0, 4.0] and excluded == 2
    assert [r.max_act for r in ts.positives()] == [10.0, 9.0]  # the quantile record below the typical level is out
    # a sparse feature keeps the 1/10 rule: most random contexts do not fire at all
    sparse = EvalSet(1, 1, "x", 10.0, (*top, ex(0.0, "random"), ex(0.0, "random"), ex(7.0, "random")))
    assert sparse.threshold == 1.0 and len(sparse.negatives()[0]) == 2
    # a dense on/off feature: a typical context fires at (or above half) the max; only the contexts that do not
    # fire at all are negatives, so a context-level split says nothing it cannot say
    onoff = EvalSet(1, 1, "x", 1.0, (ex(1.0, "top"), *(ex(p, "random") for p in (0.0, 1.0, 1.0, 1.0))))
    assert onoff.threshold == pytest.approx(0.1) and len(onoff.positives()) == 1 and len(onoff.negatives()[0]) == 1
    saturated = EvalSet(1, 1, "x", 10.0, (*top, *(ex(p, "random") for p in (5.0, 6.0, 7.0))))
    assert saturated.threshold == 1.0 and saturated.negatives() == ([], 3)


def test_detection_prompt_golden() -> None:
    seen: list[ChatRequest] = []

    def spy(req: ChatRequest) -> str:
        seen.append(req)
        return _oracle(req)

    DetectionScorer(ScoreConfig(batch=6), _client(spy), load_prompt("detect")).score([_ts()])
    FuzzingScorer(ScoreConfig(batch=6), _client(spy), load_prompt("fuzz")).score([_ts()])
    for name, req in zip(("detect_prompt.txt", "fuzz_prompt.txt"), (seen[0], seen[-1]), strict=True):
        _golden(name, "".join(f"<|{m.role}|>\n{m.content}\n" for m in req.messages))


class _BagEmbedder:
    """Bag-of-words vectors: enough to check the wiring of the embedding scorer without a model."""

    name = "bag"

    def encode(self, texts: list[str]) -> np.ndarray:
        vocab = sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})
        m = np.array([[t.lower().count(w) for w in vocab] for t in texts], dtype=float)
        m[:, [i for i, w in enumerate(vocab) if w.isdigit()]] *= 5
        m += 1e-3
        return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_embedding_scorer_wiring() -> None:
    ts = EvalSet(1, 1, "years 1862 1999 1901 four digit numbers", 3.0, _ts().records)
    (out,) = EmbeddingScorer(ScoreConfig(n_boot=50), _BagEmbedder()).score([ts])
    assert out.status == "ok" and out.value == 1.0 and out.n == 6


@pytest.mark.slow
def test_embedding_scorer_real_minilm() -> None:
    from autointerp.score.embed import Embedder

    ts = EvalSet(1, 1, "years and dates", 3.0, _ts().records)
    (out,) = EmbeddingScorer(ScoreConfig(n_boot=50), Embedder()).score([ts])
    assert out.status == "ok" and out.value is not None and out.value > 0.5


def test_score_stage_rows_rerun_and_listing(collected_db: str) -> None:
    over: dict[str, Any] = {
        "db": collected_db,
        "llm": {"fake": {"backend": "fake", "model": "scripted"}},
        "explain.llm": "fake",
        "explain.features": "all",
        "explain.limit": 3,
        "explain.min_examples": 1,
        "score.llm": "fake",
        "score.methods": ["detection", "fuzzing"],
    }
    cfg = load_config(None, over)
    store = open_store(cfg.db)
    from autointerp.explain.run import run_explain
    from autointerp.score.run import run_score

    run_explain(cfg, store)
    first = run_score(cfg, store)
    assert first.explanations >= 1 and set(first.rows) == {"detection", "fuzzing"}
    again = run_score(cfg, store)
    assert again.llm_calls == 0 and again.rows == {} and again.skipped == 2 * first.explanations
    con = sqlite3.connect(cfg.db.split("///", 1)[1])
    rows = con.execute("select method, status, value, ci_low, ci_high, n, model, prompt_hash from score").fetchall()
    assert len(rows) == 2 * first.explanations
    for _method, status, value, lo, hi, n, model, phash in rows:
        assert model == "fake:scripted" and len(phash) == 12 and n >= 0
        assert status in ("ok", "undefined", "failed")
        if status == "ok":
            assert lo <= value <= hi
        else:
            assert value is None  # a failure or an undefined score is never stored as a number
    listed = list_features(store, sort="score", score_method="detection", limit=None)
    scored = [f for f in listed if f.score is not None]
    assert [f.score for f in scored] == sorted((f.score for f in scored), reverse=True)
    assert listed[: len(scored)] == scored  # unscored features come last
