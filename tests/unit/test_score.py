"""Properties and worked examples of the pure scoring metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from autointerp.metrics import ScoreResult, auroc, balanced_accuracy, correlation_score, embedding_score

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
