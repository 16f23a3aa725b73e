"""Causal verification (the `intervene` stage): golden judge prompt, strict answer parsing, position balance for any
number of shown pairs (property-tested), ties / unparsable answers / failed calls (stored as failures, never as
answers), the verdict rules, store upserts, the stage's idempotence with a scripted judge, and the CLI end to end on
a tiny GPT-2. The accuracy interval and the exact test themselves are tested in test_metrics.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import select
from typer.testing import CliRunner

from autointerp.config import RunConfig, load_config
from autointerp.intervene.identity import VERIFY_PROMPTS, Identity
from autointerp.intervene.judge import (
    Evidence,
    Judgement,
    Pair,
    Thresholds,
    best_correlational,
    causal_score,
    decide,
    judge_many,
    judge_plan,
    judge_request,
    parse_judgement,
)
from autointerp.intervene.measure import Measurer
from autointerp.intervene.run import run_intervene
from autointerp.llm.fake import fake_client
from autointerp.llm.types import ChatRequest, PermanentLLMError
from autointerp.metrics import binomial_p_value, choice_accuracy
from autointerp.prompts import load_prompt
from autointerp.store import open_store
from autointerp.store.engine import Store
from autointerp.store.interventions import (
    headline_verdict,
    latest_intervention,
    verdicts_for,
    write_intervention,
)
from autointerp.store.llm_log import SqlResponseCache
from autointerp.store.tables import Explanation, Feature, InterventionRow, Score, Verdict

PROPS = settings(max_examples=60, deadline=None)


def _pairs(n: int = 4) -> list[Pair]:
    return [Pair(VERIFY_PROMPTS[i], f" plain text number {i}", f" STEERED text about ships {i}") for i in range(n)]


def _texts(req: ChatRequest) -> tuple[str, str]:
    user = req.messages[-1].content
    a = user.split("Text A: ", 1)[1].split("\n", 1)[0]
    b = user.split("Text B: ", 1)[1].split("\n", 1)[0]
    return a, b


def picks_steered(req: ChatRequest) -> str:
    a, _b = _texts(req)
    return "A" if "STEERED" in a else "B"


# ----------------------------------------------------------------------------------------------------
# Judge prompt, parsing, position balance


def test_judge_prompt_golden(golden: Any) -> None:
    pair = Pair("The letter on the table said", " that the\nmeeting was moved.", " ships, sails and the open sea")
    req = judge_request(load_prompt("judge"), "words about ships and sailing ", pair, True, 8)
    rendered = "".join(f"<|{m.role}|>\n{m.content}\n" for m in req.messages)
    golden("judge_prompt.txt", rendered)
    assert req.max_tokens == 8 and req.temperature == 0.0
    assert "Text A: ships, sails and the open sea" in rendered and "Text B: that the\\nmeeting was moved." in rendered
    assert "The letter on the table said" not in rendered  # the judge sees the explanation and the pair only


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("A", "A"),
        ("B", "B"),
        (" b.\n\nBecause it mentions ships", "B"),
        ("Answer: A", "A"),
        ("**Text B**", "B"),
        ('"A"', "A"),
        ("tie", "tie"),
        ("Tie.", "tie"),
        ("neither", "tie"),
        ("both", "tie"),
        ("", None),
        ("A and B", None),
        ("I think A", None),
        ("AB", None),
        ("Text C", None),
        ("You choose to tie", None),
        ("Explanation: no clear pattern", None),
    ],
)
def test_parse_judgement_is_strict(raw: str, want: str | None) -> None:
    assert parse_judgement(raw) == want


def test_steered_text_is_shown_first_and_second_equally_often() -> None:
    assert judge_plan(_pairs(8)) == [(i, i % 2 == 0) for i in range(8)]
    # identical pairs are not shown; the alternation runs over the shown pairs, so the balance holds
    pairs = _pairs(6)
    pairs[1] = Pair(pairs[1].prompt, " same", " same ")
    pairs[2] = Pair(pairs[2].prompt, " x\n", " x\n")
    assert judge_plan(pairs) == [(0, True), (3, False), (4, True), (5, False)]
    # an odd count shows its last pair a second time, in the other order
    assert judge_plan(_pairs(3)) == [(0, True), (1, False), (2, True), (2, False)]
    assert judge_plan(_pairs(1)) == [(0, True), (0, False)]
    assert judge_plan(pairs[:3]) == [(0, True), (0, False)]
    assert judge_plan(pairs[1:3]) == []


@PROPS
@given(n=st.integers(0, 40), data=st.data(), letter=st.sampled_from(["A", "B"]))
def test_a_judge_that_always_answers_one_letter_scores_exactly_chance(n: int, data: st.DataObject, letter: str) -> None:
    same = data.draw(st.sets(st.integers(0, n - 1))) if n else set()
    pairs = [
        Pair(
            VERIFY_PROMPTS[i % 16],
            " same\n" if i in same else f" plain {i}",
            " same\n" if i in same else f" STEERED {i}",
        )
        for i in range(n)
    ]
    client = fake_client(lambda _req: letter, model="judge")
    (js,) = judge_many(client, load_prompt("judge"), [("ships", pairs)], 8)
    res = causal_score(js)
    n_shown = n - len(same)
    sent = client.backend.requests  # type: ignore[attr-defined]
    assert len(sent) == n_shown + n_shown % 2 and res.counts["same"] == len(same)
    assert sum("STEERED" in _texts(r)[0] for r in sent) * 2 == len(sent)  # steered as Text A in half the showings
    if n_shown == 0:
        assert res.status == "undefined" and res.score.value is None and res.p_value is None
        return
    # an accuracy over the shown pairs (a pair shown twice counts once), with the Jeffreys interval of k = n / 2
    assert res.status == "ok" and res.score.value == 0.5 and res.score.n == n_shown
    ref = choice_accuracy([True, False] * (n_shown // 2) + [0.5] * (n_shown % 2))
    assert (res.score.ci_low, res.score.ci_high) == (ref.ci_low, ref.ci_high)
    assert res.p_value == pytest.approx(1.0)


def test_a_pair_shown_twice_counts_once() -> None:
    # three pairs, the last shown in both orders: a judge that finds the steered text scores 3 of 3 pairs
    (js,) = judge_many(fake_client(picks_steered, model="judge"), load_prompt("judge"), [("ships", _pairs(3))], 8)
    assert [(j.pair, j.steered_first, j.outcome) for j in js] == [
        (0, True, "correct"), (1, False, "correct"), (2, True, "correct"), (2, False, "correct")
    ]  # fmt: skip
    res = causal_score(js)
    assert res.score.value == 1.0 and res.score.n == 3 and res.counts["correct"] == 4
    assert res.p_value == pytest.approx(2 / 2**3)  # three trials, not four
    assert res.score.ci_low == choice_accuracy([True] * 3).ci_low
    # the doubled pair right in one order and tied in the other: its decided showing is its credit
    half = [*js[:3], Judgement(2, "tie", False, "tie")]
    assert causal_score(half).score.value == 1.0 and causal_score(half).score.n == 3
    # right in one order, wrong in the other: half a pair right; a tie for the exact test (left out of it)
    split = [*js[:3], Judgement(2, "wrong", False, "B")]
    res = causal_score(split)
    assert res.score.value == pytest.approx(2.5 / 3) and res.score.n == 3
    assert res.p_value == pytest.approx(binomial_p_value(2, 2))
    assert res.score.ci_low == choice_accuracy([True, True, 0.5]).ci_low
    # neither showing decided: the pair is undecided, counted once
    lost = [*js[:2], Judgement(2, "failed", True, None, "x"), Judgement(2, "unparsable", False, "?")]
    res = causal_score(lost)
    assert res.score.n == 2 and res.score.n_excluded == 1 and res.n_failed == 1


def test_judge_that_always_answers_a_scores_exactly_chance() -> None:
    client = fake_client(lambda _req: "A", model="judge")
    (js,) = judge_many(client, load_prompt("judge"), [("ships", _pairs(8))], 8)
    res = causal_score(js)
    assert res.status == "ok" and res.score.value == 0.5 and res.score.n == 8
    assert res.counts["correct"] == res.counts["wrong"] == 4
    assert res.p_value == pytest.approx(1.0)
    assert res.score.ci_low is not None and res.score.ci_low < 0.5 < (res.score.ci_high or 0)
    shown_a = [_texts(r)[0] for r in client.backend.requests]  # type: ignore[attr-defined]
    assert sum("STEERED" in a for a in shown_a) == 4  # steered shown as A exactly half the time


def test_judge_that_finds_the_steered_text() -> None:
    (js,) = judge_many(fake_client(picks_steered, model="judge"), load_prompt("judge"), [("ships", _pairs(8))], 8)
    res = causal_score(js)
    assert res.score.value == 1.0 and res.score.ci_high == 1.0
    assert res.score.ci_low is not None and res.score.ci_low > 0.5
    assert res.p_value == pytest.approx(2 / 2**8)
    assert all(j.outcome == "correct" for j in js)


def test_ties_unparsable_answers_and_failures_are_not_answers() -> None:
    script = {0: "A", 1: "tie", 2: "I would say A", 3: PermanentLLMError("refused", backend="fake")}

    def responder(req: ChatRequest) -> Any:
        a, b = _texts(req)
        i = int((a + b).split("STEERED text about ships ", 1)[1][0])
        return script.get(i, "B")

    (js,) = judge_many(fake_client(responder, model="judge"), load_prompt("judge"), [("ships", _pairs(6))], 8)
    outcomes = [j.outcome for j in js]
    # pair 0: steered first, "A" -> correct; pair 4: steered first, "B" -> wrong; pair 5: steered second, "B" -> correct
    assert outcomes == ["correct", "tie", "unparsable", "failed", "wrong", "correct"]
    failed = js[3]
    assert failed.answer is None and failed.error is not None and "refused" in failed.error
    assert js[2].answer == "I would say A"  # the raw answer is kept
    res = causal_score(js)
    assert res.status == "ok" and res.score.n == 3 and res.score.value == pytest.approx(2 / 3)
    assert res.n_failed == 1 and res.counts["tie"] == 1 and res.counts["unparsable"] == 1
    assert res.score.n_excluded == 3


def test_undefined_and_failed_causal_scores() -> None:
    ties = [Judgement(i, "tie", i % 2 == 0, "tie") for i in range(4)]
    res = causal_score(ties)
    assert res.status == "undefined" and res.score.value is None and "4 ties" in (res.reason or "")
    fails = [Judgement(i, "failed", i % 2 == 0, None, "boom") for i in range(4)]
    res = causal_score(fails)
    assert res.status == "failed" and res.score.value is None and res.n_failed == 4
    same = [Judgement(i, "same") for i in range(4)]
    res = causal_score(same)
    assert res.status == "undefined" and "unchanged" in (res.reason or "")
    # a failed pair among answered ones: the score stands on the answered ones, the failure is counted
    mixed = [Judgement(0, "correct", True, "A"), Judgement(1, "failed", False, None, "x")]
    res = causal_score(mixed)
    assert res.status == "ok" and res.score.value == 1.0 and res.score.n == 1 and res.n_failed == 1


# ----------------------------------------------------------------------------------------------------
# Verdict


TH = Thresholds(min_causal_ci_low=0.5, min_act_increase=0.0, min_simulation=0.3, min_classification=0.65)
SIM_OK = Evidence("simulation", 0.45)


@pytest.mark.parametrize(
    ("corr", "status", "lo", "hi", "act", "want", "why"),
    [
        (SIM_OK, "ok", 0.62, 1.0, 0.2, "verified", "simulation 0.45"),
        (Evidence("detection", 0.7), "ok", 0.62, 1.0, 0.2, "verified", "detection"),
        (Evidence("simulation", 0.1), "ok", 0.62, 1.0, 0.2, "unverified", "simulation 0.10 < 0.30"),
        (Evidence("fuzzing", 0.6), "ok", 0.62, 1.0, 0.2, "unverified", "fuzzing 0.60 < 0.65"),
        (None, "ok", 0.62, 1.0, 0.2, "unverified", "no correlational score"),
        (SIM_OK, "ok", 0.3, 0.9, 0.2, "unverified", "not above 0.50"),
        (SIM_OK, "undefined", None, None, 0.2, "unverified", "causal check undefined"),
        (SIM_OK, "failed", None, None, 0.2, "unverified", "causal check failed"),
        (SIM_OK, "ok", 0.0, 0.38, 0.2, "contradicted", "more often than chance"),
        # a feature that steering does not make fire more (an input-side feature): unverified, not contradicted
        (SIM_OK, "ok", 0.62, 1.0, -0.05, "unverified", "activation increase -0.050 x max not above"),
        (SIM_OK, "ok", 0.62, 1.0, 0.0, "unverified", "activation increase +0.000 x max not above"),
        (SIM_OK, "undefined", None, None, 0.0, "unverified", "causal check undefined"),  # texts unchanged
        (SIM_OK, "ok", 0.62, 1.0, None, "unverified", "activation"),
    ],
)
def test_verdict_rules(
    corr: Evidence | None,
    status: str,
    lo: float | None,
    hi: float | None,
    act: float | None,
    want: str,
    why: str,
) -> None:
    verdict, reason = decide(corr, status, lo, hi, act, TH)
    assert verdict == want and why in reason, reason


def test_activation_threshold_is_configurable() -> None:
    th = Thresholds(min_act_increase=0.3)
    assert decide(SIM_OK, "ok", 0.62, 1.0, 0.2, th)[0] == "unverified"
    assert decide(SIM_OK, "ok", 0.62, 1.0, 0.31, th)[0] == "verified"


def test_best_correlational_prefers_simulation() -> None:
    class S:
        def __init__(self, method: str, value: float | None, status: str = "ok", id: int = 0) -> None:
            self.method, self.value, self.status, self.id = method, value, status, id

    rows = [S("detection", 0.9, id=1), S("simulation", 0.2, id=2), S("simulation", 0.4, id=3), S("embedding", 0.99)]
    assert best_correlational(rows) == Evidence("simulation", 0.4, 3)
    assert best_correlational([S("fuzzing", 0.7, id=4), S("detection", 0.8, id=5)]) == Evidence("detection", 0.8, 5)
    assert best_correlational([S("simulation", None, "undefined"), S("embedding", 0.9)]) is None


# ----------------------------------------------------------------------------------------------------
# The stage with a scripted judge and a scripted measurer (no model)


class ScriptedMeasurer(Measurer):
    """Returns fixed continuations: the steered ones contain STEERED; the feature fires more on them."""

    def __init__(self, cfg: RunConfig, store: Store, act_increase: float = 0.25) -> None:
        super().__init__(cfg, store)
        self.calls = 0
        self.act_increase = act_increase

    def measure(self, f: Feature, ident: Identity) -> InterventionRow:
        assert f.id is not None
        self.calls += 1
        n = self.cfg.intervene.n_prompts
        samples = [
            {"prompt": VERIFY_PROMPTS[i], "baseline": f" plain {i}", "steered": f" STEERED {f.index} {i}"}
            for i in range(n)
        ]
        return InterventionRow(
            feature_id=f.id,
            mode="add",
            config_hash=ident.intervention_hash,
            config=ident.intervention_config,
            status="ok",
            strength=3.0,
            target_kl=0.5,
            kl=0.49,
            converged=True,
            promoted=[{"token_id": 1, "token": " ship", "value": 0.8}],
            suppressed=[{"token_id": 2, "token": " the", "value": -0.5}],
            samples=samples,
            act_baseline=0.1,
            act_steered=0.1 + self.act_increase,
            act_increase=self.act_increase,
            n_forward=10,
            n_generated=4,
        )


def _explain_rows(store: Store, feature_ids: list[int]) -> list[int]:
    with store.session() as s:
        rows = []
        for i, fid in enumerate(feature_ids):
            for explainer in ("llm", "tokens"):
                rows.append(
                    Explanation(
                        feature_id=fid,
                        explainer=explainer,
                        model="fake:m" if explainer == "llm" else "",
                        prompt="explain",
                        prompt_hash="p",
                        config_hash="c",
                        status="ok",
                        text=f"words about ships {i} ({explainer})",
                    )
                )
        rows.append(
            Explanation(feature_id=feature_ids[0], explainer="llm", model="fake:m2", prompt="explain",
                        prompt_hash="p", config_hash="c", status="failed", error="unparsable")
        )  # fmt: skip
        s.add_all(rows)
        s.commit()
        return [r.id for r in rows if r.status == "ok"]  # type: ignore[misc]


def _stage(collected_db: str, **over: Any) -> tuple[RunConfig, Store, list[Feature]]:
    cfg = load_config(None, {"db": collected_db, **over})
    store = open_store(cfg.db)
    with store.session() as s:
        feats = list(s.exec(select(Feature).where(Feature.status == "ok").order_by(Feature.id).limit(3)).all())
    _explain_rows(store, [f.id for f in feats[:2] if f.id is not None])
    return cfg, store, feats


def test_stage_stores_scores_verdicts_and_reruns_for_free(collected_db: str) -> None:
    cfg, store, feats = _stage(collected_db)
    cache = SqlResponseCache(store)
    measurer = ScriptedMeasurer(cfg, store)
    client = fake_client(picks_steered, cache=cache, model="judge")
    res = run_intervene(cfg, store, client=client, measurer=measurer)
    assert res.selected == 2 and res.explanations == 4 and res.interventions_new == 2 and measurer.calls == 2
    assert res.scores_new == 4 and res.judge_calls == 16  # 4 explanations x 4 pairs
    with store.session() as s:
        scores = s.exec(select(Score).where(Score.method == "intervention")).all()
        verdicts = s.exec(select(Verdict)).all()
    assert len(scores) == 4 and all(sc.status == "ok" and sc.value == 1.0 and sc.n == 4 for sc in scores)
    assert all(sc.model == "fake:judge" and sc.prompt == "judge" for sc in scores)
    assert all(sc.details["p_value"] == pytest.approx(2 / 2**4) for sc in scores)  # 4 of 4 pairs right
    js = scores[0].details["judgements"]
    assert [j["steered_first"] for j in js] == [True, False, True, False]
    # no correlational score yet: the causal check passes, the verdict waits for the correlational one
    assert {v.verdict for v in verdicts} == {"unverified"} and len(verdicts) == 4
    assert all("no correlational score" in v.reason for v in verdicts)

    # rerun: nothing redone, no judge call, no measurement
    again = run_intervene(cfg, store, client=fake_client(picks_steered, cache=cache, model="judge"), measurer=measurer)
    assert again.judge_calls == 0 and again.cache_hits == 0 and measurer.calls == 2
    assert again.interventions_reused == 2 and again.scores_reused == 4 and again.scores_new == 0

    # a simulation score arrives: the next run upgrades the verdicts, still without a call
    with store.session() as s:
        llm_expl = s.exec(select(Explanation).where(Explanation.explainer == "llm", Explanation.status == "ok")).all()
        for e in llm_expl:
            s.add(Score(explanation_id=e.id, feature_id=e.feature_id, method="simulation", model="fake:sim",
                        status="ok", value=0.55, ci_low=0.4, ci_high=0.7, n=20))  # fmt: skip
        s.commit()
    client3 = fake_client(picks_steered, cache=cache, model="judge")
    third = run_intervene(cfg, store, client=client3, measurer=measurer)
    assert third.judge_calls == 0 and third.verdicts == {"verified": 2, "unverified": 2}
    fid = feats[0].id
    assert fid is not None
    views = verdicts_for(store, fid)
    assert len(views) == 2 and headline_verdict(views).verdict == "verified"  # type: ignore[union-attr]
    assert headline_verdict(views).correlational_value == 0.55  # type: ignore[union-attr]
    iv = latest_intervention(store, fid)
    assert iv is not None and iv.promoted[0]["token"] == " ship" and iv.act_increase == 0.25


def test_stage_failed_calls_are_failures_and_are_retried(collected_db: str) -> None:
    cfg, store, _ = _stage(collected_db, **{"intervene.explainer": "llm"})
    cache = SqlResponseCache(store)
    measurer = ScriptedMeasurer(cfg, store)
    down = fake_client(lambda _r: PermanentLLMError("server down", backend="fake"), cache=cache, model="judge")
    res = run_intervene(cfg, store, client=down, measurer=measurer)
    assert res.explanations == 2 and res.scores_new == 2
    with store.session() as s:
        scores = s.exec(select(Score).where(Score.method == "intervention")).all()
    assert all(sc.status == "failed" and sc.value is None and sc.n == 0 and sc.n_failed == 4 for sc in scores)
    assert all(j["outcome"] == "failed" and "server down" in j["error"] for j in scores[0].details["judgements"])
    assert res.verdicts == {"unverified": 2}
    # the judge is back: the failed rows are redone (the intervention is not), in place
    res = run_intervene(cfg, store, client=fake_client(picks_steered, cache=cache, model="judge"), measurer=measurer)
    assert res.judge_calls == 8 and measurer.calls == 2 and res.scores_new == 2
    with store.session() as s:
        scores = s.exec(select(Score).where(Score.method == "intervention")).all()
    assert len(scores) == 2 and all(sc.status == "ok" and sc.n_failed == 0 for sc in scores)


def test_stage_unverified_when_the_feature_does_not_fire_more(collected_db: str) -> None:
    cfg, store, _ = _stage(collected_db, **{"intervene.explainer": "tokens"})
    res = run_intervene(
        cfg, store, client=fake_client(picks_steered, model="judge"), measurer=ScriptedMeasurer(cfg, store, -0.1)
    )
    assert res.verdicts == {"unverified": 2}
    with store.session() as s:
        reasons = [v.reason for v in s.exec(select(Verdict)).all()]
    assert all("activation increase -0.100 x max not above" in r for r in reasons), reasons


def test_selector_counts_features_without_explanation(collected_db: str) -> None:
    cfg, store, feats = _stage(collected_db, **{"intervene.features": "all", "intervene.limit": 2})
    res = run_intervene(
        cfg, store, client=fake_client(picks_steered, model="judge"), measurer=ScriptedMeasurer(cfg, store)
    )
    with store.session() as s:
        n_ok = len(s.exec(select(Feature).where(Feature.status == "ok")).all())
    assert res.without_explanation == n_ok - 2 and res.interventions_new == 2


def test_measure_failures_are_stored_and_retried(collected_db: str) -> None:
    from autointerp.intervene.hooks import InterventionError

    class Broken(Measurer):
        def measure(self, f: Feature, ident: Identity) -> InterventionRow:
            raise InterventionError(f"no such SAE for {f.key}")

    cfg, store, feats = _stage(collected_db)
    res = run_intervene(cfg, store, client=fake_client(picks_steered, model="judge"), measurer=Broken(cfg, store))
    assert res.interventions_failed == 2 and res.judge_calls == 0 and res.scores_new == 0
    with store.session() as s:
        rows = s.exec(select(InterventionRow)).all()
    assert all(r.status == "failed" and "no such SAE" in (r.error or "") for r in rows)
    res = run_intervene(
        cfg, store, client=fake_client(picks_steered, model="judge"), measurer=ScriptedMeasurer(cfg, store)
    )
    assert res.interventions_new == 2 and res.scores_new == 4
    with store.session() as s:
        assert len(s.exec(select(InterventionRow)).all()) == 2  # replaced in place


def test_write_intervention_keeps_the_first_ok_row(collected_db: str) -> None:
    store = open_store(collected_db)
    with store.session() as s:
        fid = s.exec(select(Feature.id)).first()
    assert fid is not None
    first = write_intervention(store, InterventionRow(feature_id=fid, mode="add", config_hash="h", status="ok", kl=0.5))
    again = write_intervention(store, InterventionRow(feature_id=fid, mode="add", config_hash="h", status="ok", kl=0.9))
    assert first.id == again.id and again.kl == 0.5  # a concurrent worker's finished row wins
    other = write_intervention(store, InterventionRow(feature_id=fid, mode="add", config_hash="g", status="failed"))
    fixed = write_intervention(store, InterventionRow(feature_id=fid, mode="add", config_hash="g", status="ok", kl=1))
    assert other.id == fixed.id and fixed.status == "ok" and fixed.kl == 1


# ----------------------------------------------------------------------------------------------------
# The real model part on a tiny GPT-2, and the CLI end to end


def test_continuation_activations_match_one_sequence_at_a_time(tiny_subject: Any) -> None:
    import torch

    from autointerp.intervene.hooks import Intervention, Neuron
    from autointerp.intervene.measure import continuation_activations
    from autointerp.intervene.steer import generate
    from autointerp.subject.sites import capture

    target = Neuron("blocks.1.mlp.post", 5, 128)
    gens = [
        generate(tiny_subject, "The state of the Union", max_new_tokens=5),
        generate(tiny_subject, "Hi", [Intervention.add(target, 30.0)], max_new_tokens=3),
        generate(tiny_subject, "Once upon a time there", max_new_tokens=0),
    ]
    got = continuation_activations(tiny_subject, target, gens)
    assert [len(g) for g in got] == [len(g.token_ids) for g in gens]
    for g, acts in zip(gens, got, strict=True):
        ids = torch.tensor([[*g.prompt_ids, *g.token_ids]])
        x = capture(tiny_subject.model, tiny_subject.layout, ["blocks.1.mlp.post"], ids)["blocks.1.mlp.post"]
        want = x[0, len(g.prompt_ids) :, 5].tolist()
        assert acts == pytest.approx(want, abs=1e-5)


def _cli_config(tmp: Path, db: str) -> Path:
    cfg = tmp / "cfg.toml"
    cfg.write_text(
        f"""db = "{db}"
[intervene]
target_kl = 0.01
n_prompts = 4
max_new_tokens = 6
[llm.judge]
backend = "fake"
model = "judge"
"""
    )
    return cfg


def test_cli_intervene_and_features_show(tmp_path: Path, collected_db: str) -> None:
    from autointerp.cli import app

    store = open_store(collected_db)
    with store.session() as s:
        feats = list(s.exec(select(Feature).where(Feature.status == "ok").order_by(Feature.id).limit(2)).all())
    _explain_rows(store, [f.id for f in feats if f.id is not None])
    cfg = str(_cli_config(tmp_path, collected_db))
    runner = CliRunner()
    res = runner.invoke(app, ["intervene", "--config", cfg, "--llm", "judge"])
    assert res.exit_code == 0, res.output
    assert "2 features" in res.output and "interventions 2 new" in res.output and "16 judge calls" in res.output
    with store.session() as s:
        ivs = s.exec(select(InterventionRow)).all()
        scores = s.exec(select(Score).where(Score.method == "intervention")).all()
    assert len(ivs) == 2 and all(r.status == "ok" and r.converged for r in ivs)
    assert all(abs((r.kl or 0) - 0.01) <= 0.001 and len(r.samples) == 4 and len(r.promoted) == 10 for r in ivs)
    assert all(r.act_increase is not None and r.n_forward > 0 for r in ivs)
    # the fake judge's default answer is no letter: unparsable, never an answer
    assert len(scores) == 4
    assert all(sc.value is None and sc.n == 0 and sc.n_failed == 0 for sc in scores), [s.reason for s in scores]

    again = runner.invoke(app, ["intervene", "--config", cfg, "--llm", "judge"])
    assert again.exit_code == 0 and "0 judge calls" in again.output and "interventions 0 new" in again.output
    assert "0 forward passes" in again.output

    shown = runner.invoke(app, ["features", "show", feats[0].key, "--config", cfg, "--json"])
    assert shown.exit_code == 0, shown.output
    d = json.loads(shown.stdout)
    assert len(d["direct_effects"]["promoted"]) == 10 and len(d["direct_effects"]["suppressed"]) == 10
    assert d["verdict"]["verdict"] == "unverified" and len(d["verdicts"]) == 2
    assert "causal check undefined" in d["verdict"]["reason"]
    text = runner.invoke(app, ["features", "show", feats[0].key, "--config", cfg])
    assert text.exit_code == 0 and "promotes:" in text.stdout and "verdict:" in text.stdout
