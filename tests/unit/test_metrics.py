"""Properties and worked examples of the pure scoring metrics."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autointerp.metrics import (
    ScoreResult,
    auroc,
    balanced_accuracy,
    binomial_p_value,
    choice_accuracy,
    correlation_score,
    embedding_score,
)

PROPS = settings(max_examples=60, deadline=None)

# Values on a 1/8 grid: exact in binary, so an affine map of the inputs loses no information of its own and any
# difference in the score is the metric's fault.
grid = st.integers(-400, 400).map(lambda k: k / 8)


@st.composite
def record_pairs(draw: st.DrawFn, values: st.SearchStrategy[float] = grid) -> tuple[list[np.ndarray], list[np.ndarray]]:
    lengths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=8))
    real = [np.array(draw(st.lists(values, min_size=n, max_size=n))) for n in lengths]
    pred = [np.array(draw(st.lists(values, min_size=n, max_size=n))) for n in lengths]
    return real, pred


def assert_well_formed(r: ScoreResult, lo: float, hi: float) -> None:
    if r.value is None:
        assert r.reason and r.ci_low is None and r.ci_high is None
        return
    assert math.isfinite(r.value) and lo <= r.value <= hi
    if r.ci_low is None or r.ci_high is None:
        assert r.reason and r.ci_low is None and r.ci_high is None
    else:
        assert lo <= r.ci_low <= r.value <= r.ci_high <= hi


# ------------------------------------------------------------------------------------------------- correlation


@PROPS
@given(
    data=record_pairs(),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-1e3, 1e3),
)
def test_correlation_invariant_to_affine_rescaling_of_predictions(
    data: tuple[list[np.ndarray], list[np.ndarray]], scale: float, shift: float
) -> None:
    real, pred = data
    base = correlation_score(real, pred, n_boot=200)
    moved = correlation_score(real, [scale * p + shift for p in pred], n_boot=200)
    assert (base.value is None) == (moved.value is None)
    if base.value is not None and moved.value is not None:
        assert moved.value == pytest.approx(base.value, abs=1e-9)
        assert (base.ci_low is None) == (moved.ci_low is None)
        if base.ci_low is not None and moved.ci_low is not None:
            assert moved.ci_low == pytest.approx(base.ci_low, abs=1e-9)
            assert moved.ci_high == pytest.approx(base.ci_high, abs=1e-9)


@PROPS
@given(data=record_pairs(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)), seed=st.integers(0, 2**16))
def test_correlation_nan_free_in_bounds_and_ci_contains_estimate(
    data: tuple[list[np.ndarray], list[np.ndarray]], seed: int
) -> None:
    real, pred = data
    r = correlation_score(real, pred, n_boot=200, seed=seed)
    assert_well_formed(r, -1.0, 1.0)
    assert r.n == len(real)


@PROPS
@given(data=record_pairs())
def test_correlation_equals_pooled_pearson(data: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    real, pred = data
    x, y = np.concatenate(real), np.concatenate(pred)
    assume(np.ptp(x) > 0 and np.ptp(y) > 0)
    r = correlation_score(real, pred, n_boot=0)
    assert r.value == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert r.ci_low is None and r.reason and "n_boot=0" in r.reason


@PROPS
@given(data=record_pairs(), c=grid)
def test_constant_predictions_are_undefined(data: tuple[list[np.ndarray], list[np.ndarray]], c: float) -> None:
    real, _ = data
    assume(sum(x.size for x in real) >= 2)  # one token is reported as "too few tokens"
    r = correlation_score(real, [np.full_like(x, c) for x in real])
    assert r.value is None and r.ci_low is None
    assert r.reason and "constant" in r.reason


def test_constant_real_activations_are_undefined() -> None:
    r = correlation_score([np.zeros(4), np.zeros(3)], [np.arange(4.0), np.arange(3.0)])
    assert r.value is None and r.reason == "constant real activations: correlation undefined"


def test_rounding_noise_counts_as_constant() -> None:
    r = correlation_score([np.array([0.0, 1.0])], [np.array([0.1 + 0.2, 0.3])])
    assert r.value is None


def test_correlation_pools_tokens_not_per_record_means() -> None:
    # Each record alone is perfectly correlated (r = 1), pooled over all 4 tokens r = 4 / 5.
    r = correlation_score([np.array([1.0, 2.0]), np.array([3.0, 4.0])], [np.array([1.0, 3.0]), np.array([2.0, 4.0])])
    assert r.value == pytest.approx(0.8)
    assert r.n == 2


def test_correlation_worked_perfect_and_negative() -> None:
    real = [np.array([0.0, 1.0, 2.0]), np.array([5.0, 0.0])]
    assert correlation_score(real, [2 * x + 1 for x in real]).value == pytest.approx(1.0)
    assert correlation_score(real, [-x for x in real]).value == pytest.approx(-1.0)


@PROPS
@given(data=record_pairs(), seed=st.integers(0, 100))
def test_bootstrap_resamples_records_not_tokens(data: tuple[list[np.ndarray], list[np.ndarray]], seed: int) -> None:
    # Repeating every record's tokens changes nothing under a record bootstrap (a token bootstrap would narrow it).
    real, pred = data
    once = correlation_score(real, pred, n_boot=200, seed=seed)
    twice = correlation_score([np.tile(x, 2) for x in real], [np.tile(x, 2) for x in pred], n_boot=200, seed=seed)
    assert (once.value is None) == (twice.value is None)
    if once.value is not None and twice.value is not None:
        assert twice.value == pytest.approx(once.value, abs=1e-9)
        assert (once.ci_low is None) == (twice.ci_low is None)
        if once.ci_low is not None:
            assert twice.ci_low == pytest.approx(once.ci_low, abs=1e-9)
            assert twice.ci_high == pytest.approx(once.ci_high, abs=1e-9)


def test_correlation_deterministic_given_seed() -> None:
    rng = np.random.default_rng(3)
    real = [rng.random(16) for _ in range(30)]
    pred = [x + rng.normal(0, 0.5, 16) for x in real]
    a, b = correlation_score(real, pred, seed=7), correlation_score(real, pred, seed=7)
    assert a == b
    assert correlation_score(real, pred, seed=8).ci_low != a.ci_low
    assert a.ci_low is not None and a.ci_high is not None and a.ci_low < a.value < a.ci_high  # type: ignore[operator]
    assert a.n_resamples == 1000


def test_correlation_ci_none_when_too_few_resamples_defined() -> None:
    # Real varies only in record 0 and predictions only in record 1: a resample is defined only if it draws both
    # (probability about 0.63² ≈ 0.4), so most resamples are undefined and no interval is reported.
    real = [np.array([0.0, 1.0]), np.zeros(2)] + [np.zeros(2)] * 20
    pred = [np.zeros(2), np.array([0.0, 1.0])] + [np.zeros(2)] * 20
    r = correlation_score(real, pred, n_boot=500)
    assert r.value is not None and r.value < 0
    assert r.ci_low is None and r.reason and r.reason.startswith("only ")
    assert 0 < r.n_resamples < 250


def test_correlation_single_record_has_no_interval() -> None:
    r = correlation_score([np.array([0.0, 1.0, 3.0])], [np.array([0.0, 2.0, 2.5])])
    assert r.value is not None and r.ci_low is None and r.reason and "2 records" in r.reason


def test_correlation_length_mismatch_names_record() -> None:
    real = [np.zeros(3), np.zeros(4), np.zeros(5)]
    pred = [np.zeros(3), np.zeros(4), np.zeros(6)]
    with pytest.raises(ValueError, match=r"record 2: 5 real activations but 6 predicted"):
        correlation_score(real, pred)
    with pytest.raises(ValueError, match="3 real records but 2 predicted"):
        correlation_score(real, pred[:2])
    with pytest.raises(ValueError, match="record 1: .*finite"):
        correlation_score([np.zeros(2), np.array([1.0, np.nan])], [np.zeros(2), np.zeros(2)])


def test_correlation_no_tokens_is_undefined() -> None:
    assert correlation_score([], []).value is None
    assert correlation_score([np.zeros(0)], [np.zeros(0)]).value is None


# ------------------------------------------------------------------------------------------ balanced accuracy


labelled = st.lists(st.tuples(st.booleans(), st.one_of(st.none(), st.booleans())), min_size=0, max_size=40)


@PROPS
@given(items=labelled, seed=st.integers(0, 2**16))
def test_balanced_accuracy_excludes_failed_calls(items: list[tuple[bool, bool | None]], seed: int) -> None:
    labels = [lab for lab, _ in items]
    preds = [p for _, p in items]
    r = balanced_accuracy(labels, preds, n_samples=500, seed=seed)
    kept = [(lab, p) for lab, p in items if p is not None]
    ref = balanced_accuracy([lab for lab, _ in kept], [p for _, p in kept], n_samples=500, seed=seed)
    assert r.n_excluded == sum(p is None for p in preds)
    assert r.n == len(kept)
    assert (r.value, r.ci_low, r.ci_high) == (ref.value, ref.ci_low, ref.ci_high)
    assert_well_formed(r, 0.0, 1.0)
    pos, neg = [p for lab, p in kept if lab], [p for lab, p in kept if not lab]
    if pos and neg:
        assert r.value == pytest.approx((sum(pos) / len(pos) + sum(not p for p in neg) / len(neg)) / 2)
    else:
        assert r.value is None and r.reason


def test_failed_calls_are_not_no_answers() -> None:
    # Reading the two None as "no" would give TNR 1, TPR 1/3: 0.667. Excluded, the score is the honest 1.0.
    r = balanced_accuracy([True, True, True, False, False], [True, None, None, False, False])
    assert r.value == 1.0 and r.n == 3 and r.n_excluded == 2


def test_balanced_accuracy_worked_example() -> None:
    r = balanced_accuracy([True, True, True, True, False, False], [True, True, True, False, False, True])
    assert r.value == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_always_no_is_chance_not_plain_accuracy() -> None:
    # SAEBench's pitfall: 4 positives, 10 negatives, always "no" has accuracy 0.71 but balanced accuracy 0.5.
    r = balanced_accuracy([True] * 4 + [False] * 10, [False] * 14)
    assert r.value == 0.5


def test_perfect_small_sample_interval_is_not_degenerate() -> None:
    r = balanced_accuracy([True] * 10 + [False] * 10, [True] * 10 + [False] * 10)
    assert r.value == 1.0 and r.ci_high == 1.0
    assert r.ci_low is not None and 0.75 < r.ci_low < 0.95


def test_balanced_accuracy_missing_class() -> None:
    r = balanced_accuracy([True, True], [True, False])
    assert r.value is None and r.reason and "negative" in r.reason
    r = balanced_accuracy([True, False], [True, None])  # the only negative failed
    assert r.value is None and r.n_excluded == 1


def test_balanced_accuracy_rejects_error_codes() -> None:
    with pytest.raises(ValueError, match="item 1: prediction must be a bool or None"):
        balanced_accuracy([True, False], [True, -1])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        balanced_accuracy([True, False], [True])


# ------------------------------------------------------------------------------------------------------ AUROC


def brute_auroc(s: np.ndarray, lab: np.ndarray) -> float:
    pos, neg = s[lab], s[~lab]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


scored = st.lists(st.tuples(st.integers(-5, 5), st.booleans()), min_size=1, max_size=40)  # small range: many ties


@PROPS
@given(items=scored, seed=st.integers(0, 2**16))
def test_auroc_equals_pairwise_count(items: list[tuple[int, bool]], seed: int) -> None:
    s = np.array([x for x, _ in items], dtype=float)
    lab = np.array([y for _, y in items])
    r = auroc(s, lab, n_boot=200, seed=seed)
    assert_well_formed(r, 0.0, 1.0)
    if lab.all() or not lab.any():
        assert r.value is None and r.reason
        return
    assert r.value == pytest.approx(brute_auroc(s, lab), abs=1e-12)
    # Rank-based: a strictly increasing map changes nothing; reversing the order gives the complement.
    assert auroc(np.exp(s / 3), lab, n_boot=0).value == pytest.approx(r.value, abs=1e-12)
    assert auroc(-s, lab, n_boot=0).value == pytest.approx(1 - r.value, abs=1e-12)


def test_auroc_bootstrap_equals_pairwise_reference() -> None:
    # The cumulative-weight trick must equal the weighted pairwise count on the same resample counts.
    # Coupled to the implementation's draw order: counts for sorted positives, then for sorted negatives.
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=30), 1)
    lab = rng.random(30) < 0.4
    n_boot, seed = 300, 11
    r = auroc(s, lab, n_boot=n_boot, seed=seed)
    pos, neg = np.sort(s[lab]), np.sort(s[~lab])
    k = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    g = np.random.default_rng(seed)
    c_pos = g.multinomial(pos.size, np.full(pos.size, 1 / pos.size), size=n_boot)
    c_neg = g.multinomial(neg.size, np.full(neg.size, 1 / neg.size), size=n_boot)
    boots = np.einsum("bi,ij,bj->b", c_pos, k, c_neg) / (pos.size * neg.size)
    q_lo, q_hi = np.quantile(boots, [0.025, 0.975])
    assert r.value is not None
    assert r.ci_low == pytest.approx(min(q_lo, r.value), abs=1e-12)
    assert r.ci_high == pytest.approx(max(q_hi, r.value), abs=1e-12)


def test_auroc_separated_reversed_and_tied() -> None:
    lab = np.array([True, True, True, False, False, False])
    s = np.array([4.0, 5.0, 6.0, 1.0, 2.0, 3.0])
    assert auroc(s, lab).value == 1.0
    assert auroc(-s, lab).value == 0.0
    tied = auroc(np.zeros(6), lab)
    assert tied.value == 0.5 and tied.ci_low == 0.5 and tied.ci_high == 0.5
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]).value == pytest.approx(0.75)  # sklearn's doc example


def test_auroc_missing_class_and_small_classes() -> None:
    r = auroc([1.0, 2.0], [True, True])
    assert r.value is None and r.reason and "negative" in r.reason
    r = auroc([3.0, 1.0, 2.0], [True, False, False])
    assert r.value == 1.0 and r.ci_low is None and r.reason and "2 items per class" in r.reason


def test_auroc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auroc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="score 1 is not finite"):
        auroc([1.0, np.nan], [True, False])
    with pytest.raises(ValueError, match="labels must be booleans"):
        auroc([1.0, 2.0], [2, 0])


# -------------------------------------------------------------------------------------------- embedding score


def test_embedding_score_ranks_by_cosine_not_length() -> None:
    e = np.array([1.0, 0.0, 0.0])
    # Activating contexts point along e (whatever their length); the others are long but off-axis.
    ctx = np.array([[0.1, 0.01, 0.0], [3.0, 0.5, 0.0], [2.0, 0.0, 0.3], [5.0, 9.0, 0.0], [1.0, 2.0, 4.0], [0, 7.0, 1]])
    lab = np.array([True, True, True, False, False, False])
    r = embedding_score(5 * e, ctx, lab, n_boot=200)
    assert r.value == 1.0 and r.n == 6
    assert embedding_score(-e, ctx, lab, n_boot=0).value == 0.0


def test_embedding_score_rejects_zero_and_misshapen_vectors() -> None:
    ctx = np.eye(3)
    with pytest.raises(ValueError, match="explanation vector is zero"):
        embedding_score(np.zeros(3), ctx, [True, False, False])
    with pytest.raises(ValueError, match="context vector 1 is zero"):
        embedding_score(np.ones(3), np.array([[1.0, 0, 0], [0, 0, 0]]), [True, False])
    with pytest.raises(ValueError, match=r"expected expl_vec \(d,\)"):
        embedding_score(np.ones(4), ctx, [True, False, False])


# ------------------------------------------------------------------------------------------------ ScoreResult


def test_score_result_enforces_invariants() -> None:
    with pytest.raises(ValueError, match="does not contain"):
        ScoreResult(0.5, 0.6, 0.7, 10)
    with pytest.raises(ValueError, match="needs a reason"):
        ScoreResult(None, None, None, 10)
    with pytest.raises(ValueError, match="finite"):
        ScoreResult(float("nan"), None, None, 10, reason="x")
    with pytest.raises(ValueError, match="both"):
        ScoreResult(0.5, 0.4, None, 10, reason="x")


# ------------------------------------------------------------------------------------------ accuracy vs chance


@PROPS
@given(st.lists(st.sampled_from([True, False, None]), max_size=60), st.sampled_from([0.01, 0.05, 0.2]))
def test_choice_accuracy_is_well_formed(items: list[bool | None], alpha: float) -> None:
    r = choice_accuracy(items, alpha=alpha)
    decided = [x for x in items if x is not None]
    assert r.n == len(decided) and r.n_excluded == len(items) - len(decided)
    if not decided:
        assert r.value is None and r.reason
        return
    assert r.value == sum(decided) / len(decided)
    assert r.ci_low is not None and r.ci_high is not None
    assert 0.0 <= r.ci_low <= r.value <= r.ci_high <= 1.0
    assert (r.ci_low == 0.0) == (sum(decided) == 0) or r.ci_low > 0
    # mirror symmetry: flipping every answer mirrors the interval
    m = choice_accuracy([None if x is None else not x for x in items], alpha=alpha)
    assert m.ci_low == pytest.approx(1 - r.ci_high, abs=1e-5) and m.ci_high == pytest.approx(1 - r.ci_low, abs=1e-5)


@pytest.mark.parametrize(("k", "n"), [(1, 4), (5, 10), (18, 20), (40, 100), (3, 3)])
def test_choice_accuracy_matches_jeffreys_quantiles(k: int, n: int) -> None:
    draws = np.random.default_rng(0).beta(k + 0.5, n - k + 0.5, 400_000)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    r = choice_accuracy([True] * k + [False] * (n - k))
    assert r.ci_high is not None and r.ci_low is not None
    assert r.ci_low == pytest.approx(lo, abs=3e-3)
    assert r.ci_high == (1.0 if k == n else pytest.approx(hi, abs=3e-3))


@PROPS
@given(st.integers(0, 80).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_binomial_p_value_properties(kn: tuple[int, int]) -> None:
    k, n = kn
    p = binomial_p_value(k, n)
    assert 0.0 < p <= 1.0
    assert p == pytest.approx(binomial_p_value(n - k, n), rel=1e-9)  # symmetric at 1/2
    if abs(2 * k - n) <= 1:
        assert p == pytest.approx(1.0)
    if k < n and 2 * k >= n:  # further from n/2, smaller p
        assert binomial_p_value(k + 1, n) <= p + 1e-12


def test_binomial_p_value_known_values() -> None:
    assert binomial_p_value(10, 10) == pytest.approx(2 / 1024)
    assert binomial_p_value(8, 10) == pytest.approx(112 / 1024)  # 2 * P(X >= 8) = 2 * 56 / 1024
    assert binomial_p_value(0, 0) == 1.0
    assert binomial_p_value(3, 10, 0.3) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        binomial_p_value(3, 2)


# ------------------------------------------------------------------------------------------ exact values and edges
# What the properties above leave open, pinned so that a changed constant, boundary, message or default fails: the
# reasons and messages word for word, the small-sample boundaries, the defaults, the Jeffreys prior's parameters
# (against the exact Beta CDF), and the intervals against independent computations.


def _exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def _records() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(5)
    real = [rng.random(int(k)) for k in rng.integers(1, 9, 12)]
    return real, [x + rng.normal(0, 0.4, x.size) for x in real]


def test_score_result_messages_and_a_value_without_interval_needs_a_reason() -> None:
    with pytest.raises(ValueError, match=_exact("ci_low and ci_high must both be set or both be None")):
        ScoreResult(0.5, 0.4, None, 10, reason="x")
    with pytest.raises(ValueError, match=_exact("an undefined score cannot have an interval")):
        ScoreResult(None, 0.1, 0.2, 10, reason="x")
    with pytest.raises(ValueError, match=_exact("a missing value or interval needs a reason")):
        ScoreResult(0.5, None, None, 10)
    with pytest.raises(ValueError, match=_exact("a missing value or interval needs a reason")):
        ScoreResult(None, None, None, 10, reason="")
    with pytest.raises(ValueError, match=_exact("interval [0.6, 0.7] does not contain 0.5")):
        ScoreResult(0.5, 0.6, 0.7, 10)
    with pytest.raises(ValueError, match=_exact("ci_high must be finite, got inf")):
        ScoreResult(0.5, 0.4, math.inf, 10)
    assert ScoreResult(0.5, 0.5, 0.5, 1).reason is None  # a degenerate interval is still an interval


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1])
def test_alpha_must_lie_strictly_between_0_and_1(alpha: float) -> None:
    real, pred = _records()
    calls = [
        lambda: correlation_score(real, pred, alpha=alpha),
        lambda: balanced_accuracy([True, False], [True, False], alpha=alpha),
        lambda: auroc([1.0, 0.0], [True, False], alpha=alpha),
        lambda: choice_accuracy([True], alpha=alpha),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=_exact(f"alpha must be in (0, 1), got {alpha}")):
            call()


def test_draw_counts_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match=_exact("n_boot must be >= 0, got -1")):
        correlation_score(*_records(), n_boot=-1)
    with pytest.raises(ValueError, match=_exact("n_boot must be >= 0, got -2")):
        balanced_accuracy([True, False], [True, False], n_samples=-2)


def test_defaults_seed_0_and_their_draw_counts() -> None:
    real, pred = _records()
    r = correlation_score(real, pred)
    assert r == correlation_score(real, pred, n_boot=1000, seed=0, alpha=0.05) and r.n_resamples == 1000
    labels, preds = [True] * 6 + [False] * 6, [True] * 4 + [False] * 2 + [False] * 5 + [True]
    b = balanced_accuracy(labels, preds)
    assert b == balanced_accuracy(labels, preds, n_samples=4000, seed=0, alpha=0.05) and b.n_resamples == 4000
    s = np.arange(12.0) % 5
    a = auroc(s, labels)
    assert a == auroc(s, labels, n_boot=1000, seed=0, alpha=0.05) and a.n_resamples == 1000
    vecs = np.random.default_rng(2).normal(size=(13, 4))
    e = embedding_score(vecs[0], vecs[1:], labels)
    assert e == embedding_score(vecs[0], vecs[1:], labels, n_boot=1000, seed=0, alpha=0.05)
    assert e.n_resamples == 1000


# -- correlation


@pytest.mark.parametrize("seed", [0, 7])
def test_correlation_interval_equals_a_direct_bootstrap(seed: int, pooled_reference: Any) -> None:
    real, pred = _records()
    r = correlation_score(real, pred, n_boot=400, seed=seed, alpha=0.1)
    value, lo, hi, usable = pooled_reference(real, pred, n_boot=400, seed=seed, alpha=0.1)
    assert r.value == pytest.approx(value, abs=1e-12) and r.n == 12 and r.reason is None
    assert (r.ci_low, r.ci_high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert r.n_resamples == usable == 400


def test_correlation_is_exact_at_extreme_scales_and_offsets() -> None:
    # rescaled before squaring (no overflow at 1e200, no underflow at 1e-200) and centred before the sums (an
    # offset a million times the spread loses nothing)
    real, pred = _records()
    ref = correlation_score(real, pred, n_boot=200, seed=1)
    for scale, shift in ((1e-200, 0.0), (1e200, 0.0), (1.0, 1e6), (1e-3, 1e4)):
        moved = correlation_score([scale * x + shift for x in real], pred, n_boot=200, seed=1)
        assert moved.value == pytest.approx(ref.value, abs=1e-9), (scale, shift)
        assert moved.ci_low == pytest.approx(ref.ci_low, abs=1e-9) and moved.ci_high == pytest.approx(ref.ci_high)


def test_correlation_of_float16_records_is_computed_in_float64() -> None:
    real, pred = _records()
    ref = correlation_score(real, pred, n_boot=100)
    f16 = [x.astype(np.float16) for x in real]
    assert correlation_score(f16, pred, n_boot=100) == correlation_score(
        [x.astype(float) for x in f16], pred, n_boot=100
    )
    g16 = [x.astype(np.float16) for x in pred]
    assert correlation_score(real, g16, n_boot=100) == correlation_score(
        real, [x.astype(float) for x in g16], n_boot=100
    )
    assert ref.value is not None


def test_rounding_level_differences_end_at_eight_ulps() -> None:
    eps = np.finfo(np.float64).eps
    pred = [np.array([0.0, 1.0, 0.0])]
    at = correlation_score([np.array([1.0, 1.0 - 8 * eps, 1.0])], pred)
    assert at == ScoreResult(None, None, None, 1, reason="constant real activations: correlation undefined")
    above = correlation_score([np.array([1.0, 1.0 - 8.5 * eps, 1.0])], pred, n_boot=0)
    assert above.value == pytest.approx(-1.0, abs=1e-12)


def test_perfect_correlations_are_clipped_to_plus_minus_one() -> None:
    # unclipped, rounding gives -1.0000000000000002 and 1.0000000000000002 on these
    x = np.array([0.625, 0.375, 0.25, 0.0, 0.5, -0.75, -0.125])
    assert correlation_score([x], [-3 * x - 2], n_boot=0).value == -1.0
    y = np.array([0.0, -0.25, 1.25, 1.0])
    assert correlation_score([y], [2 * y + 4], n_boot=0).value == 1.0


def test_correlation_reasons_word_for_word() -> None:
    assert correlation_score([], []) == ScoreResult(
        None, None, None, 0, reason="0 tokens; a correlation needs at least 2"
    )
    one = correlation_score([np.array([1.0])], [np.array([2.0])])
    assert one == ScoreResult(None, None, None, 1, reason="1 tokens; a correlation needs at least 2")
    real = [np.array([0.0, 1.0]), np.array([2.0])]
    const = correlation_score(real, [np.ones(2), np.ones(1)])
    assert const == ScoreResult(None, None, None, 2, reason="constant predictions: correlation undefined")
    flat = correlation_score([np.ones(2), np.ones(1)], real)
    assert flat == ScoreResult(None, None, None, 2, reason="constant real activations: correlation undefined")
    v = correlation_score(real, [np.array([0.0, 2.0]), np.array([1.0])], n_boot=0)
    assert v == ScoreResult(v.value, None, None, 2, reason="no interval requested (n_boot=0)")
    single = correlation_score([np.array([0.0, 1.0, 3.0])], [np.array([0.0, 2.0, 2.5])])
    assert single == ScoreResult(single.value, None, None, 1, reason="a record bootstrap needs at least 2 records")


def test_two_records_are_enough_for_an_interval() -> None:
    r = correlation_score(
        [np.array([0.0, 1.0, 3.0]), np.array([2.0, 0.5])], [np.array([0.0, 2.0, 2.5]), np.array([1.0, 0.0])]
    )
    assert r.ci_low is not None and r.ci_high is not None and r.n == 2 and r.n_resamples == 1000


def _half_defined_seed(n_usable: int) -> int:
    """A seed whose 10 resamples of two records draw both records exactly n_usable times (the metric's draw)."""
    for seed in range(1000):
        counts = np.random.default_rng(seed).multinomial(2, np.full(2, 0.5), size=10)
        if int((counts[:, 0] == 1).sum()) == n_usable:
            return seed
    raise AssertionError("no such seed")


def test_an_interval_needs_at_least_half_of_the_resamples_defined() -> None:
    # the predictions vary only in record 1, the activations only in record 0: a resample is defined iff it has both
    real, pred = [np.array([0.0, 1.0]), np.array([2.0, 2.0])], [np.array([5.0, 5.0]), np.array([0.0, 1.0])]
    half = correlation_score(real, pred, n_boot=10, seed=_half_defined_seed(5))
    assert half.ci_low is not None and half.n_resamples == 5
    less = correlation_score(real, pred, n_boot=10, seed=_half_defined_seed(4))
    assert less == ScoreResult(
        less.value, None, None, 2, reason="only 4 of 10 bootstrap resamples were defined", n_resamples=4
    )


def test_correlation_names_a_record_that_is_not_1d() -> None:
    with pytest.raises(ValueError, match=_exact("record 0: activations must be 1-D, got shapes (1, 3) and (3,)")):
        correlation_score([np.zeros((1, 3))], [np.zeros(3)])
    with pytest.raises(ValueError, match=_exact("record 1: activations must be 1-D, got shapes (2,) and (2, 1)")):
        correlation_score([np.zeros(2), np.zeros(2)], [np.zeros(2), np.zeros((2, 1))])


def test_no_floating_point_warning_escapes() -> None:
    # empty records make some resamples empty (0/0 in the pooled sums); the Jeffreys quadrature takes log(0)
    real = [np.zeros(0)] * 5 + [np.array([0.0, 1.0, 2.0]), np.array([1.0, 0.0])]
    pred = [np.zeros(0)] * 5 + [np.array([0.0, 2.0, 1.0]), np.array([0.0, 1.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = correlation_score(real, pred, n_boot=300, seed=0)
        c = choice_accuracy([True, False, True])
    assert r.value is not None and r.ci_low is not None and 200 < r.n_resamples < 300
    assert c.ci_low is not None and 0 < c.ci_low < c.ci_high < 1  # type: ignore[operator]


# -- balanced accuracy


def test_balanced_accuracy_interval_is_the_jeffreys_monte_carlo() -> None:
    labels = [True] * 7 + [False] * 5
    preds = [True] * 5 + [False] * 2 + [False] * 4 + [True]
    r = balanced_accuracy(labels, preds, n_samples=3000, seed=9, alpha=0.1)
    rng = np.random.default_rng(9)  # coupled to the draw order: the positives' rate, then the negatives'
    draws = 0.5 * (rng.beta(5 + 0.5, 2 + 0.5, 3000) + rng.beta(4 + 0.5, 1 + 0.5, 3000))
    lo, hi = np.quantile(draws, [0.05, 0.95])
    assert r.value == (5 / 7 + 4 / 5) / 2 and r.n == 12 and r.n_resamples == 3000
    assert (r.ci_low, r.ci_high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_balanced_accuracy_reasons_and_messages_word_for_word() -> None:
    r = balanced_accuracy([False, False], [True, False])
    assert r == ScoreResult(None, None, None, 2, reason="no answered positive items: balanced accuracy undefined")
    r = balanced_accuracy([True, False, False], [True, None, None])
    assert r == ScoreResult(
        None, None, None, 1, reason="no answered negative items: balanced accuracy undefined", n_excluded=2
    )
    with pytest.raises(ValueError, match=_exact("item 0: label must be a bool, got 1")):
        balanced_accuracy([1, 0], [True, False])  # type: ignore[list-item]
    r = balanced_accuracy([True, True, False, False, False], [True, False, False, None, True], n_samples=0)
    assert r == ScoreResult(
        0.5 * (1 / 2 + 1 / 2), None, None, 4, reason="no interval requested (n_samples=0)", n_excluded=1
    )
    one = balanced_accuracy([True, False], [True, False], n_samples=1)
    assert one.ci_low is not None and one.n_resamples == 1


# -- AUROC and embedding score


def test_auroc_reasons_and_small_class_boundary() -> None:
    assert auroc([1.0, 2.0], [False, False]) == ScoreResult(
        None, None, None, 2, reason="no positive items: AUROC undefined"
    )
    assert auroc([1.0], [True]) == ScoreResult(None, None, None, 1, reason="no negative items: AUROC undefined")
    assert auroc([1.0, 0.0, 2.0], [True, False, True], n_boot=0) == ScoreResult(
        1.0, None, None, 3, reason="no interval requested (n_boot=0)"
    )
    need = "a stratified bootstrap needs at least 2 items per class"
    assert auroc([1.0, 0.0, 2.0], [True, False, True]) == ScoreResult(1.0, None, None, 3, reason=need)
    assert auroc([1.0, 0.0, -1.0], [True, False, False]) == ScoreResult(1.0, None, None, 3, reason=need)
    two = auroc([1.0, 0.0, 2.0, 0.5], [True, False, True, False], n_boot=300)
    assert two.ci_low is not None and two.n_resamples == 300 and two.n == 4


def test_auroc_in_several_chunks_of_resamples() -> None:
    # 4,001 items: 499 resamples per chunk, so 600 resamples take two chunks, the second one partial
    rng = np.random.default_rng(0)
    lab = rng.random(4001) < 0.3
    s = rng.normal(size=4001) + lab
    r = auroc(s, lab, n_boot=600, seed=2)
    assert r.value == pytest.approx(brute_auroc(s[:400], lab[:400]), abs=0.1) and r.n_resamples == 600
    assert r.ci_low is not None and r.ci_high is not None and r.ci_high - r.ci_low < 0.06


def test_auroc_converts_scores_to_floats_and_names_bad_shapes() -> None:
    from fractions import Fraction

    assert auroc([Fraction(1, 3), Fraction(2, 3), Fraction(1, 2)], [False, True, False], n_boot=0).value == 1.0
    with pytest.raises(ValueError, match=_exact("scores and labels must be 1-D, got shapes (1, 2) and (2,)")):
        auroc([[1.0, 2.0]], [True, False])
    with pytest.raises(ValueError, match=_exact("labels must be booleans (or 0/1)")):
        auroc([1.0, 2.0], [2, 0])


def test_embedding_score_is_the_auroc_of_cosines_in_float64() -> None:
    rng = np.random.default_rng(4)
    e, ctx = rng.normal(size=3), rng.normal(size=(10, 3))
    lab = [True, True, True, True, False, False, True, False, True, False]
    cos = (ctx @ e) / (np.linalg.norm(ctx, axis=1) * np.linalg.norm(e))
    want = auroc(cos, lab, n_boot=300, seed=4, alpha=0.2)
    assert embedding_score(e, ctx, lab, n_boot=300, seed=4, alpha=0.2) == want
    assert want.ci_low != auroc(cos, lab, n_boot=300, seed=5, alpha=0.2).ci_low  # the seed and alpha matter here
    assert want.ci_low != auroc(cos, lab, n_boot=300, seed=4, alpha=0.05).ci_low
    # half-precision embeddings of a few hundred: their squared norms overflow float16, not float64
    ctx16 = np.array([[300, 0.03], [300, 0.06], [300, 0], [300, 0.09]], dtype=np.float16)
    e16 = np.array([300, 300], dtype=np.float16)
    assert embedding_score(e16, ctx16, [True, False, False, True], n_boot=0).value == 0.75


def test_embedding_score_messages_word_for_word() -> None:
    ctx = np.eye(3)
    with pytest.raises(
        ValueError, match=_exact("expected expl_vec (d,) and context_vecs (n, d), got (1, 3) and (3, 3)")
    ):
        embedding_score(np.ones((1, 3)), ctx, [True, False, False])
    with pytest.raises(ValueError, match=_exact("embedding vectors must be finite")):
        embedding_score(np.ones(3), np.array([[1.0, 0, 0], [0, np.nan, 0], [0, 0, 1]]), [True, False, False])
    with pytest.raises(ValueError, match=_exact("explanation vector is zero")):
        embedding_score(np.zeros(3), ctx, [True, False, False])


# -- exact test and forced-choice accuracy


def jeffreys_cdf(x: float, k: int, n: int) -> float:
    """The exact CDF of Beta(k + 1/2, n - k + 1/2) at x in (0, 1), independently of the metric's quadrature:
    I_x(1/2, 1/2) = (2 / pi) asin(sqrt(x)), then the recurrences I_x(a + 1, b) = I_x(a, b) - x^a (1 - x)^b / (a B(a, b))
    and I_x(a, b + 1) = I_x(a, b) + x^a (1 - x)^b / (b B(a, b))."""
    a = b = 0.5
    v = 2 / math.pi * math.asin(math.sqrt(x))

    def term() -> float:
        return math.exp(a * math.log(x) + b * math.log1p(-x) - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))

    for _ in range(k):
        v -= term() / a
        a += 1
    for _ in range(n - k):
        v += term() / b
        b += 1
    return v


def jeffreys_quantile(q: float, k: int, n: int) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if jeffreys_cdf(mid, k, n) < q else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(
    ("k", "n", "alpha"), [(0, 1, 0.05), (1, 4, 0.05), (3, 3, 0.1), (5, 10, 0.05), (18, 20, 0.2), (7, 30, 0.05)]
)
def test_choice_accuracy_interval_is_the_exact_jeffreys_interval(k: int, n: int, alpha: float) -> None:
    r = choice_accuracy([True] * k + [False] * (n - k), alpha=alpha)
    assert r.value == k / n and r.n == n
    assert r.ci_low == (0.0 if k == 0 else pytest.approx(jeffreys_quantile(alpha / 2, k, n), abs=1e-7))
    assert r.ci_high == (1.0 if k == n else pytest.approx(jeffreys_quantile(1 - alpha / 2, k, n), abs=1e-7))


def test_choice_accuracy_far_in_the_tails() -> None:
    # at alpha = 1e-6 the quantiles sit in the first and last steps of the quadrature's CDF
    for k, n in ((20, 20), (12, 20), (3, 3)):
        r = choice_accuracy([True] * k + [False] * (n - k), alpha=1e-6)
        assert r.ci_low == pytest.approx(jeffreys_quantile(5e-7, k, n), abs=1e-7)
        assert r.ci_high == (1.0 if k == n else pytest.approx(jeffreys_quantile(1 - 5e-7, k, n), abs=1e-7))


def test_choice_accuracy_on_many_items_stays_finite() -> None:
    r = choice_accuracy([True] * 600 + [False] * 400)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 1000)
    assert r.ci_low == pytest.approx(0.6 - half_width, abs=2e-3) and r.ci_high == pytest.approx(
        0.6 + half_width, abs=2e-3
    )


def test_choice_accuracy_takes_partial_credits() -> None:
    # half a pair right: Beta(1, 1), the uniform, whose quantiles are alpha / 2 and 1 - alpha / 2
    r = choice_accuracy([0.5, None])
    assert r.value == 0.5 and r.n == 1 and r.n_excluded == 1
    assert r.ci_low == pytest.approx(0.025, abs=1e-7) and r.ci_high == pytest.approx(0.975, abs=1e-7)
    assert choice_accuracy([0.0, 1.0, np.float64(0.5)]) == choice_accuracy([False, True, 0.5])
    assert choice_accuracy([1.0, 1.0]).ci_high == 1.0 and choice_accuracy([0.0]).ci_low == 0.0
    for bad in (1.5, -0.5, math.nan, 1, "yes"):
        with pytest.raises(
            ValueError, match=_exact(f"item 0: must be a bool, a credit in [0, 1] or None, got {bad!r}")
        ):
            choice_accuracy([bad])  # type: ignore[list-item]
    none = choice_accuracy([None, None])
    assert none == ScoreResult(None, None, None, 0, reason="no decided items: accuracy undefined", n_excluded=2)


def test_binomial_p_value_exact_values_and_messages() -> None:
    assert binomial_p_value(3, 10) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # outcomes as likely: 0-3, 7-10
    assert binomial_p_value(1, 1, 0.3) == pytest.approx(0.3)
    assert binomial_p_value(0, 1, 0.3) == pytest.approx(1.0)
    # an outcome whose probability is subnormal (2^-1063) still counts itself and its mirror image
    assert 2.0**-1063 < binomial_p_value(0, 1063) < 3 * 2.0**-1063
    with pytest.raises(ValueError, match=_exact("need 0 <= k <= n, got k=3, n=2")):
        binomial_p_value(3, 2)
    for p in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=_exact(f"p must be in (0, 1), got {p}")):
            binomial_p_value(1, 2, p)
