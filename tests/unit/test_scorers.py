"""Simulation, detection, fuzzing and embedding scorers with scripted LLMs: the simulation score's exact pooled
correlation and interval on the logprob and JSON paths, labels, batching, failures left out (never "no"), golden
prompts; the score stage end to end on a collected database (rows with their values, idempotent rerun, listing by
score), and through the command line."""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autointerp.config import ScoreConfig, load_config
from autointerp.llm.fake import FakeBackend, default_answer, fake_client
from autointerp.llm.types import ChatRequest, LLMError, PermanentLLMError
from autointerp.metrics import balanced_accuracy
from autointerp.prompts import load_prompt
from autointerp.records import Example, as_example, decoder, marked, test_records
from autointerp.score.scorers import (
    DetectionScorer,
    EmbeddingScorer,
    EvalSet,
    FuzzingScorer,
    SimulationScorer,
    fuzzed,
    parse_binary_list,
)
from autointerp.score.simulate import JsonSimulator, LogprobSimulator, display_token
from autointerp.store import open_store
from autointerp.store.queries import feature_detail, list_features


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


def _oracle(req: ChatRequest) -> str:
    """Answers 1 for texts with a four-digit number (detection) or whose marks are on one (fuzzing)."""
    texts = re.findall(r"^Text \d+: (.*)$", req.messages[-1].content, re.M)
    if "<<" in req.messages[-1].content:
        return str([int(bool(re.search(r"<<\d{4}>>", t))) for t in texts])
    return str([int(bool(re.search(r"\d{4}", t))) for t in texts])


# -- simulation -------------------------------------------------------------------------------------------------
# A scripted simulator with known predictions: a shown token holding a digit gets the digit distribution
# {9: 1/2, 6: 1/2} (expected digit 7.5), one starting with a capital {3: 1}, any other {0: 0.8, 1: 0.2} (0.2); the
# simulator rescales the expected digit by 10/9.


def expected_prediction(token: str) -> float:
    """What the scripted simulator predicts for a token, computed from the rule above, not by the simulator."""
    shown = display_token(token)
    if re.search(r"\d", shown):
        return 7.5 * 10 / 9
    if shown.strip()[:1].isupper():
        return 3.0 * 10 / 9
    return 0.2 * 10 / 9


def slot_rule(text: str) -> dict[str, float]:
    """The fake backend's next-token distribution: the rule above at a slot (the text ends with the tab)."""
    if not text.endswith("\t"):
        return {"unknown": 0.0}
    token = text[text.rindex("\n") + 1 : -1]
    if re.search(r"\d", token):
        return {"9": math.log(0.5), "6": math.log(0.5), "unknown": math.log(1e-3)}
    if token.strip()[:1].isupper():
        return {"3": 0.0}
    return {"0": math.log(0.8), "1": math.log(0.2)}


def json_rule(req: ChatRequest) -> str:
    """A JSON simulator's answer by the same rule, in whole numbers: 8 for a digit, 3 for a capital, else 0."""
    tokens = json.loads(re.search(r"^Tokens \(\d+\): (.*)$", req.messages[-1].content, re.M).group(1))  # type: ignore[union-attr]
    return str([8 if re.search(r"\d", t) else 3 if t.strip()[:1].isupper() else 0 for t in tokens])


def _expected(
    records: Sequence[Example], predict: Callable[[str], float], cfg: ScoreConfig, pooled_reference: Any
) -> tuple[float, ...]:
    real = [np.array(r.acts) for r in records]
    pred = [np.array([predict(t) for t in r.tokens]) for r in records]
    return pooled_reference(real, pred, n_boot=cfg.n_boot, seed=cfg.seed)


def test_simulation_score_on_the_logprob_path_is_the_pooled_correlation(pooled_reference: Any) -> None:
    cfg = ScoreConfig(n_boot=300, seed=3)
    ts = _ts()
    sc = SimulationScorer(cfg, LogprobSimulator(fake_client(next_token=slot_rule, model="sim")))
    (out,) = sc.score([ts])
    r, lo, hi, usable = _expected(ts.records, expected_prediction, cfg, pooled_reference)
    assert out.status == "ok" and out.n == 6 and out.n_failed == 0 and out.reason is None
    assert out.value == pytest.approx(r, abs=1e-12) and 0.3 < r < 0.9  # a partial, not a perfect, correlation
    assert (out.ci_low, out.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert lo < r < hi and 150 < usable < 300  # resamples of only non-activating records are undefined, dropped
    first = out.details["records"][0]
    assert first["context"] == ts.records[0].context
    assert first["predicted"] == [round(expected_prediction(t), 3) for t in ts.records[0].tokens]
    assert sc.identity.method == "simulation" and sc.identity.config["simulator"] == "logprobs"
    assert sc.identity.model == "fake:sim" and sc.identity.prompt == "simulate"


def test_simulation_score_on_the_json_path_is_the_pooled_correlation(pooled_reference: Any) -> None:
    cfg = ScoreConfig(n_boot=200, seed=11)
    ts = _ts()
    sc = SimulationScorer(cfg, JsonSimulator(fake_client(responder=json_rule, model="sim")))
    (out,) = sc.score([ts])

    def whole(t: str) -> float:
        return 8.0 if re.search(r"\d", t) else 3.0 if t.strip()[:1].isupper() else 0.0

    r, lo, hi, _ = _expected(ts.records, whole, cfg, pooled_reference)
    assert out.status == "ok" and out.n == 6 and out.n_failed == 0
    assert out.value == pytest.approx(r, abs=1e-12)
    assert (out.ci_low, out.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert sc.identity.config["simulator"] == "json" and sc.identity.prompt == "simulate_json"


def test_a_record_whose_simulation_fails_is_counted_and_left_out(pooled_reference: Any) -> None:
    cfg = ScoreConfig(n_boot=200, seed=0)
    ts = _ts()

    def fails_on_railroads(text: str) -> dict[str, float] | LLMError:
        # the slot after the token: the row a request reads (the backend computes no other)
        return PermanentLLMError("400 refused") if text.endswith(" railroads\t") else slot_rule(text)

    (out,) = SimulationScorer(cfg, LogprobSimulator(fake_client(next_token=fails_on_railroads, model="sim"))).score(
        [ts]
    )
    kept = [r for r in ts.records if " railroads" not in r.tokens]
    r, lo, hi, _ = _expected(kept, expected_prediction, cfg, pooled_reference)
    assert out.status == "ok" and out.n == 5 and out.n_failed == 1
    assert out.value == pytest.approx(r, abs=1e-12)
    assert (out.ci_low, out.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert len(out.details["errors"]) == 1 and "LLM call failed" in out.details["errors"][0]
    assert [d["context"] for d in out.details["records"]] == [k.context for k in kept]

    # JSON path: the third record's answer is invalid, and still invalid after the re-ask
    def short_for_railroads(req: ChatRequest) -> str:
        return (
            "[0]"
            if "railroads" in req.messages[-1].content or "railroads" in req.messages[-3].content
            else json_rule(req)
        )

    (out,) = SimulationScorer(cfg, JsonSimulator(fake_client(responder=short_for_railroads, model="sim"))).score([ts])
    assert out.status == "ok" and out.n == 5 and out.n_failed == 1
    assert "after one re-ask" in out.details["errors"][0]

    # every record fails: a failed score with the reason, not a number
    down = fake_client(next_token=lambda _t: PermanentLLMError("server down"), model="sim")
    (out,) = SimulationScorer(cfg, LogprobSimulator(down)).score([ts])
    assert out.status == "failed" and out.value is None and out.n_failed == 6 and "server down" in (out.reason or "")


def test_constant_predictions_are_undefined_never_zero() -> None:
    # the fake backend's default puts all mass on "0": every prediction is 0
    (out,) = SimulationScorer(ScoreConfig(), LogprobSimulator(fake_client(model="sim"))).score([_ts()])
    assert out.status == "undefined" and out.value is None and out.ci_low is None and out.ci_high is None
    assert out.reason == "constant predictions: correlation undefined" and out.n == 6 and out.n_failed == 0


def test_parse_binary_list() -> None:
    assert parse_binary_list("[1, 0, 1]", 3) == [True, False, True]
    assert parse_binary_list("Sure: [0,1]\n", 2) == [False, True]
    for bad in ("[1, 0]", "yes", "[1, 2, 0]", ""):
        with pytest.raises(ValueError, match="JSON list of 3"):
            parse_binary_list(bad, 3)


def test_detection_perfect_judge_and_labels() -> None:
    sc = DetectionScorer(ScoreConfig(batch=4), fake_client(_oracle, model="judge"), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.status == "ok" and out.value == 1.0 and out.n == 6 and out.n_failed == 0
    assert out.ci_low is not None and out.ci_low < 1.0  # six items cannot make certainty


def test_failed_calls_are_left_out_not_counted_as_no() -> None:
    calls = {"n": 0}

    def flaky(req: ChatRequest) -> Any:
        calls["n"] += 1
        return PermanentLLMError("refused") if calls["n"] == 1 else _oracle(req)

    ts = _ts()
    sc = DetectionScorer(ScoreConfig(batch=3, seed=2), fake_client(flaky, model="judge"), load_prompt("detect"))
    (out,) = sc.score([ts])
    # The shuffle comes from the item's content (ts.rng): the first batch, the one whose call fails, holds the
    # texts at order[:3]; the perfect judge answers the rest right, and the failed ones count as neither.
    order = list(range(6))
    ts.rng(2).shuffle(order)
    labels = [True, True, True, False, False, False]  # three with a four-digit number, three random ones
    kept = [labels[k] for k in order[3:]]
    assert len(set(kept)) == 2, "seed 2 keeps both classes; pick another seed if the shuffle rule changes"
    assert out.status == "ok" and out.n_failed == 3 and out.n == 3 and out.value == 1.0
    ref = balanced_accuracy(kept, kept, seed=2)
    assert (out.ci_low, out.ci_high) == (ref.ci_low, ref.ci_high)
    assert any("LLM call failed" in e for e in out.details["errors"])


def test_every_call_failing_is_a_failed_score_not_a_zero() -> None:
    sc = DetectionScorer(ScoreConfig(), fake_client(lambda r: "I am not sure.", model="judge"), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.status == "failed" and out.value is None and "JSON list" in (out.reason or "")


def test_always_yes_is_chance() -> None:
    sc = DetectionScorer(ScoreConfig(batch=2), fake_client(lambda r: "[1, 1]", model="judge"), load_prompt("detect"))
    (out,) = sc.score([_ts()])
    assert out.value == 0.5


def test_fuzzing_marks_and_perfect_judge() -> None:
    ts = _ts()
    rng = random.Random(0)
    for r in ts.positives():
        text = fuzzed(r, rng)
        assert text.count("<<") == sum(marked(r.acts))
        assert not re.search(r"<<\d{4}>>", text)
    sc = FuzzingScorer(ScoreConfig(batch=3), fake_client(_oracle, model="judge"), load_prompt("fuzz"))
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


def test_detection_prompt_golden(golden: Any) -> None:
    seen: list[ChatRequest] = []

    def spy(req: ChatRequest) -> str:
        seen.append(req)
        return _oracle(req)

    DetectionScorer(ScoreConfig(batch=6), fake_client(spy, model="judge"), load_prompt("detect")).score([_ts()])
    FuzzingScorer(ScoreConfig(batch=6), fake_client(spy, model="judge"), load_prompt("fuzz")).score([_ts()])
    for name, req in zip(("detect_prompt.txt", "fuzz_prompt.txt"), (seen[0], seen[-1]), strict=True):
        golden(name, "".join(f"<|{m.role}|>\n{m.content}\n" for m in req.messages))


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


def _always_yes(req: ChatRequest) -> str:
    """A detection / fuzzing judge that says yes to every text; other prompts get the fake's default answer."""
    m = re.search(r"JSON list of (\d+) numbers", req.messages[-1].content)
    return str([1] * int(m.group(1))) if m else default_answer(req)


def expected_scores(store: Any, cfg: ScoreConfig, pooled_reference: Any) -> dict[tuple[int, str], tuple[Any, ...]]:
    """(explanation id, method) -> (status, value, ci_low, ci_high, n, n_failed) that the score stage must store for
    every ok explanation, with simulation by `slot_rule` and detection / fuzzing by a judge that always says yes,
    computed from the explanation's test records (`max_per_role` per role) without the scorers."""
    from sqlmodel import select

    from autointerp.store.tables import Explanation, Feature

    with store.session() as s:
        rows = s.exec(select(Explanation, Feature).join(Feature).where(Explanation.status == "ok")).all()
    want: dict[tuple[int, str], tuple[Any, ...]] = {}
    for e, f in rows:
        detail = feature_detail(store, f.key)
        decode = decoder(store, detail.summary.model)
        recs = tuple(as_example(r, decode) for r in test_records(detail.records, cfg.max_per_role))
        ts = EvalSet(e.id, f.id, e.text, f.max_act, recs)
        n_pos, n_neg = len(ts.positives()), len(ts.negatives()[0])
        for method in cfg.methods:
            if method == "simulation":
                r, lo, hi, _ = _expected(recs, expected_prediction, cfg, pooled_reference)
                want[e.id, method] = ("ok", r, lo, hi, len(recs), 0)
                continue
            p, q = (n_pos, n_neg) if method == "detection" else (n_pos, n_pos)
            if p and q:  # a judge that always says yes is at chance exactly
                ref = balanced_accuracy([True] * p + [False] * q, [True] * (p + q), seed=cfg.seed)
                want[e.id, method] = ("ok", 0.5, ref.ci_low, ref.ci_high, p + q, 0)
            else:
                want[e.id, method] = ("undefined", None, None, None, p + q, 0)
    return want


def stored_scores(db: str) -> dict[tuple[int, str], tuple[Any, ...]]:
    """The score rows as expected_scores gives them; an undefined row must hold no number and say why."""
    con = sqlite3.connect(db.split("///", 1)[1])
    rows = con.execute(
        "select explanation_id, method, status, value, ci_low, ci_high, n, n_failed, reason, model, prompt_hash "
        "from score"
    ).fetchall()
    con.close()
    out = {}
    for eid, method, status, value, lo, hi, n, n_failed, reason, model, phash in rows:
        assert model == "fake:scripted" and len(phash) == 12
        if status != "ok":  # an undefined or failed score is never stored as a number, and says why
            assert value is None and lo is None and reason and "undefined" in reason
        out[eid, method] = (status, value, lo, hi, n, n_failed)
    return out


def assert_scores(got: dict[tuple[int, str], tuple[Any, ...]], want: dict[tuple[int, str], tuple[Any, ...]]) -> None:
    assert sorted(got) == sorted(want)
    for key, row in want.items():
        status, value, lo, hi, n, n_failed = got[key]
        assert (status, n, n_failed) == (row[0], row[4], row[5]), key
        assert (value, lo, hi) == pytest.approx(row[1:4], abs=1e-9), key


def status_counts(want: dict[tuple[int, str], tuple[Any, ...]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (_e, method), (status, *_rest) in want.items():
        counts.setdefault(method, {}).setdefault(status, 0)
        counts[method][status] += 1
    return counts


def test_score_stage_rows_rerun_and_listing(collected_db: str, pooled_reference: Any) -> None:
    over: dict[str, Any] = {
        "db": collected_db,
        "llm": {"fake": {"backend": "fake", "model": "scripted"}},
        "explain.llm": "fake",
        "explain.features": "all",
        "explain.limit": 3,
        "explain.min_examples": 1,
        "score.llm": "fake",
        "score.methods": ["simulation", "detection", "fuzzing"],
        "score.max_per_role": 2,
        "score.n_boot": 200,
        "score.seed": 5,
    }
    cfg = load_config(None, over)
    store = open_store(cfg.db)
    from autointerp.explain.run import run_explain
    from autointerp.score.run import build_scorers, run_score

    run_explain(cfg, store)
    scorers = build_scorers(cfg, store)
    backend = scorers[1].client.backend  # type: ignore[attr-defined]  # one client serves every LLM scorer
    assert isinstance(backend, FakeBackend) and scorers[0].simulator.client.backend is backend  # type: ignore[attr-defined]
    backend.next_token, backend.responder = slot_rule, _always_yes
    first = run_score(cfg, store, scorers=scorers)

    want = expected_scores(store, cfg.score, pooled_reference)
    assert len({e for e, _ in want}) == first.explanations == 3
    assert_scores(stored_scores(cfg.db), want)
    assert any(w[0] == "ok" for (_, m), w in want.items() if m == "detection")  # not all "undefined"
    assert first.rows == status_counts(want) and first.skipped == 0
    assert first.llm_calls == len(backend.requests) + len(backend.logprob_requests) > 0

    again = run_score(cfg, store)
    assert again.llm_calls == 0 and again.rows == {} and again.skipped == 3 * first.explanations
    listed = list_features(store, sort="score", score_method="detection", limit=None)
    scored = [f for f in listed if f.score is not None]
    assert [f.score for f in scored] == sorted((f.score for f in scored), reverse=True) and scored
    assert listed[: len(scored)] == scored  # unscored features come last


def test_a_reviewers_edit_is_scored_like_any_explanation(collected_db: str) -> None:
    from autointerp.explain.run import run_explain
    from autointerp.score.run import build_scorers, run_score
    from autointerp.store.reviews import decide

    over: dict[str, Any] = {
        "db": collected_db, "llm": {"fake": {"backend": "fake", "model": "scripted"}}, "explain.llm": "fake",
        "explain.features": "all", "explain.limit": 1, "explain.min_examples": 1, "score.llm": "fake",
        "score.methods": ["simulation", "detection"], "score.max_per_role": 2, "score.n_boot": 50,
    }  # fmt: skip
    cfg = load_config(None, over)
    store = open_store(cfg.db)
    run_explain(cfg, store)
    scorers = build_scorers(cfg, store)
    scorers[1].client.backend.next_token, scorers[1].client.backend.responder = slot_rule, _always_yes  # type: ignore[attr-defined]
    run_score(cfg, store, scorers=scorers)
    with store.engine.connect() as conn:
        eid = conn.exec_driver_sql("SELECT id FROM explanation WHERE status = 'ok'").scalar_one()
    human = decide(store, eid, "ann", "edit", "the word tax").human_explanation_id
    scorers = build_scorers(cfg, store)
    scorers[1].client.backend.next_token, scorers[1].client.backend.responder = slot_rule, _always_yes  # type: ignore[attr-defined]
    again = run_score(cfg, store, scorers=scorers)
    assert again.explanations == 2 and again.skipped == 2  # the machine's was scored already
    with store.engine.connect() as conn:
        methods = conn.exec_driver_sql(f"SELECT method, status FROM score WHERE explanation_id = {human}").all()
    assert sorted(m for m, _s in methods) == ["detection", "simulation"]


def test_score_through_the_cli(tmp_path: Path, collected_db: str, monkeypatch: Any, pooled_reference: Any) -> None:
    from typer.testing import CliRunner

    from autointerp.cli import app
    from autointerp.config import load_config
    from autointerp.llm.base import BACKENDS
    from autointerp.llm.fake import FakeBackend
    from autointerp.store import open_store

    runner = CliRunner()
    # [llm.fake] builds the shipped fake backend, here with the scripted answers above: simulation predictions by a
    # token rule, a detection judge that always says yes
    built: list[FakeBackend] = []

    def scripted(spec: Any) -> FakeBackend:
        built.append(FakeBackend(spec, _always_yes, slot_rule))
        return built[-1]

    monkeypatch.setitem(BACKENDS, "fake", scripted)
    cfg = tmp_path / "score.toml"
    cfg.write_text(
        f"""db = "{collected_db}"
[explain]
llm = "fake"
features = "all"
limit = 2
min_examples = 1
[score]
llm = "fake"
methods = ["simulation", "detection"]
max_per_role = 2
n_boot = 200
seed = 7
[llm.fake]
backend = "fake"
model = "scripted"
"""
    )
    assert runner.invoke(app, ["explain", "--config", str(cfg)]).exit_code == 0
    built.clear()
    res = runner.invoke(app, ["score", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    want = expected_scores(open_store(collected_db), load_config(cfg, {}).score, pooled_reference)
    assert_scores(stored_scores(collected_db), want)
    counts = status_counts(want)
    assert len({e for e, _ in want}) == 2 and counts["simulation"] == {"ok": 2}
    parts = "; ".join(f"{m}: " + ", ".join(f"{n} {s}" for s, n in sorted(c.items())) for m, c in sorted(counts.items()))
    calls = sum(len(b.requests) + len(b.logprob_requests) for b in built)
    text = " ".join(res.output.split())  # the console wraps long lines
    assert f"score: 2 explanations; {parts}; 0 already scored; {calls} LLM calls; " in text, text
    assert calls > 2
    # a rerun scores nothing again, calls nothing and leaves the rows as they were
    again = runner.invoke(app, ["score", "--config", str(cfg)])
    assert again.exit_code == 0, again.output
    assert "score: 2 explanations; nothing new; 4 already scored; 0 LLM calls;" in " ".join(again.output.split())
    assert_scores(stored_scores(collected_db), want)
