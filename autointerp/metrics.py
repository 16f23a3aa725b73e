"""Pure scoring metrics: numpy in, numbers out (no torch, no store, no LLM).

Every metric returns a frozen `ScoreResult`. A score that is undefined (constant predictions, a missing class, no
data) has `value=None` and a `reason`; it is never 0 or NaN. Intervals are two-sided at level 1 - alpha and always
contain the point estimate (see each function for how). Results are deterministic given `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ScoreResult",
    "auroc",
    "balanced_accuracy",
    "binomial_p_value",
    "choice_accuracy",
    "correlation_score",
    "embedding_score",
]

FloatArray = NDArray[np.float64]

# A bootstrap interval built on a minority of the resamples (the rest undefined) describes a different population.
MIN_USABLE_FRACTION = 0.5


@dataclass(frozen=True)
class ScoreResult:
    """One score with its interval.

    value: the point estimate, None when the score is undefined (then `reason` says why).
    ci_low, ci_high: the interval, both None when it cannot be computed (then `reason` says why).
    n: units the score rests on — records for correlation, answered items for balanced accuracy, items for AUROC.
    reason: why the value or the interval is missing, else None.
    n_excluded: items left out of the score (balanced accuracy: failed LLM calls), never counted as answers.
    n_resamples: usable bootstrap resamples (or Monte Carlo draws) behind the interval; 0 when there is none.
    """

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    reason: str | None = None
    n_excluded: int = 0
    n_resamples: int = 0

    def __post_init__(self) -> None:
        # Invariants every caller (store, review page) relies on; cheap enough to check on every result.
        if (self.ci_low is None) != (self.ci_high is None):
            raise ValueError("ci_low and ci_high must both be set or both be None")
        if self.value is None and self.ci_low is not None:
            raise ValueError("an undefined score cannot have an interval")
        for name in ("value", "ci_low", "ci_high"):
            x = getattr(self, name)
            if x is not None and not math.isfinite(x):
                raise ValueError(f"{name} must be finite, got {x}")
        lo, hi, v = self.ci_low, self.ci_high, self.value
        if v is not None and lo is not None and hi is not None and not lo <= v <= hi:
            raise ValueError(f"interval [{self.ci_low}, {self.ci_high}] does not contain {self.value}")
        if (self.value is None or self.ci_low is None) and not self.reason:
            raise ValueError("a missing value or interval needs a reason")


def _interval(samples: FloatArray, estimate: float, alpha: float, lo: float, hi: float) -> tuple[float, float]:
    """Equal-tailed percentile interval, widened if needed so that it contains the point estimate.

    Percentile intervals of skewed sampling distributions can exclude the estimate (e.g. a correlation near 1, or
    Jeffreys at k = n); widening is the usual boundary fix (Brown, Cai & DasGupta 2001) and keeps the interval honest.
    """
    q_lo, q_hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return max(lo, min(float(q_lo), estimate)), min(hi, max(float(q_hi), estimate))


def _check_common(n_boot: int, alpha: float) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


# ---------------------------------------------------------------------------------------------------- correlation


def _standardize(x: FloatArray) -> FloatArray | None:
    """(x - mean) / std computed without overflow or underflow; None when x is constant.

    Differences at rounding level (e.g. 0.1 + 0.2 vs 0.3) are noise, not signal, so they count as constant.
    """
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0.0:
        return None
    y = x / top  # in [-1, 1]: squares can neither overflow (1e200) nor underflow to zero (1e-200)
    std = float(y.std())
    if not np.ptp(y) > 8 * np.finfo(np.float64).eps or not std > 0:
        return None
    return (y - y.mean()) / std


def _pearson_from_sums(s: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
    """Pearson r from pooled sums (columns: n, Σx, Σy, Σxx, Σyy, Σxy) of standardized data; also a defined mask."""
    n, sx, sy, sxx, syy, sxy = (s[..., i] for i in range(6))
    with np.errstate(divide="ignore", invalid="ignore"):
        mx, my = sx / n, sy / n
        vx, vy = sxx / n - mx * mx, syy / n - my * my
        cov = sxy / n - mx * my
        # The data are standardized (pooled variance 1), so a resample variance this small means "all constant".
        ok = (n > 0) & (vx > 1e-10) & (vy > 1e-10)
        r = np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), 0.0)
    return np.clip(r, -1.0, 1.0), ok


def correlation_score(
    real: Sequence[ArrayLike],
    predicted: Sequence[ArrayLike],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ScoreResult:
    """Pearson correlation of predicted vs real activations pooled over all tokens of all records.

    This is OpenAI's "all at once" correlation score: one correlation over the concatenated tokens, not a mean of
    per-record correlations. The interval is a percentile bootstrap that resamples whole records (tokens within a
    record are not independent), widened to contain the estimate. Resamples whose pooled correlation is undefined
    (every drawn record constant) are dropped; if fewer than half remain, or there are fewer than 2 records, the
    interval is None with a reason. Constant predictions or constant real activations give value None.

    Raises ValueError naming the record when a record's arrays differ in length, are not 1-D, or hold NaN / inf.
    """
    _check_common(n_boot, alpha)
    if len(real) != len(predicted):
        raise ValueError(f"{len(real)} real records but {len(predicted)} predicted records")
    reals: list[FloatArray] = []
    preds: list[FloatArray] = []
    for i, (r_raw, p_raw) in enumerate(zip(real, predicted, strict=True)):
        r, p = np.asarray(r_raw, dtype=np.float64), np.asarray(p_raw, dtype=np.float64)
        if r.ndim != 1 or p.ndim != 1:
            raise ValueError(f"record {i}: activations must be 1-D, got shapes {r.shape} and {p.shape}")
        if r.shape != p.shape:
            raise ValueError(f"record {i}: {r.size} real activations but {p.size} predicted")
        if not (np.isfinite(r).all() and np.isfinite(p).all()):
            raise ValueError(f"record {i}: activations must be finite (found NaN or inf)")
        reals.append(r)
        preds.append(p)
    n_rec = len(reals)
    all_r = np.concatenate(reals) if reals else np.zeros(0)
    all_p = np.concatenate(preds) if preds else np.zeros(0)
    if all_r.size < 2:
        return ScoreResult(None, None, None, n_rec, reason=f"{all_r.size} tokens; a correlation needs at least 2")
    z_pred, z_real = _standardize(all_p), _standardize(all_r)
    if z_pred is None:
        return ScoreResult(None, None, None, n_rec, reason="constant predictions: correlation undefined")
    if z_real is None:
        return ScoreResult(None, None, None, n_rec, reason="constant real activations: correlation undefined")

    # Standardized globally, the per-record sums below are O(1): the sum-of-squares formula then loses no precision,
    # and the result is invariant to affine rescaling up to rounding.
    bounds = np.cumsum([0] + [r.size for r in reals])
    stats = np.zeros((n_rec, 6))
    for i in range(n_rec):
        zr, zp = z_real[bounds[i] : bounds[i + 1]], z_pred[bounds[i] : bounds[i + 1]]
        stats[i] = (zr.size, zr.sum(), zp.sum(), zr @ zr, zp @ zp, zr @ zp)
    r_hat, ok = _pearson_from_sums(stats.sum(axis=0))
    if not ok:  # unreachable after the constant checks, kept as a guard against silent NaN
        return ScoreResult(None, None, None, n_rec, reason="correlation undefined (zero variance)")
    value = float(r_hat)

    if n_boot == 0:
        return ScoreResult(value, None, None, n_rec, reason="no interval requested (n_boot=0)")
    if n_rec < 2:
        return ScoreResult(value, None, None, n_rec, reason="a record bootstrap needs at least 2 records")
    # Each resample is a multinomial draw of record counts; pooled sums are then one matrix product.
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_rec, np.full(n_rec, 1.0 / n_rec), size=n_boot).astype(np.float64)
    boot, boot_ok = _pearson_from_sums(counts @ stats)
    usable = boot[boot_ok]
    if usable.size < MIN_USABLE_FRACTION * n_boot:
        return ScoreResult(
            value,
            None,
            None,
            n_rec,
            reason=f"only {usable.size} of {n_boot} bootstrap resamples were defined",
            n_resamples=int(usable.size),
        )
    lo, hi = _interval(usable, value, alpha, -1.0, 1.0)
    return ScoreResult(value, lo, hi, n_rec, n_resamples=int(usable.size))


# ---------------------------------------------------------------------------------------------- balanced accuracy


def balanced_accuracy(
    labels: Sequence[bool],
    predictions: Sequence[bool | None],
    *,
    n_samples: int = 4000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ScoreResult:
    """Balanced accuracy (mean of true-positive and true-negative rates) of yes/no predictions.

    Used by the detection and fuzzing scorers. A None prediction is a failed LLM call: it is excluded and counted in
    `n_excluded`, never read as "no". If the answered items lack a class, the value is None with a reason.

    Interval: each class rate gets its Jeffreys posterior Beta(k + 1/2, n - k + 1/2) (the binomial interval Brown,
    Cai & DasGupta 2001 recommend alongside Wilson for small n); the mean of the two is sampled by Monte Carlo
    (`n_samples` draws, deterministic given `seed`) and its equal-tailed quantiles are taken, widened to contain the
    estimate. Unlike a percentile bootstrap it stays honest at the boundary that detection lives on: 10/10 correct
    gives an interval reaching well below 1, where a bootstrap would give [1, 1]. Simulated coverage of the nominal
    95 % with 5-25 items per class: 0.91-0.96 (the stratified percentile bootstrap: 0.47 when both rates are 0.97).
    """
    _check_common(n_samples, alpha)
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    for i, (lab, pred) in enumerate(zip(labels, predictions, strict=True)):
        # Guard against error codes (e.g. -1) or probabilities passed as predictions.
        if not isinstance(lab, (bool, np.bool_)):
            raise ValueError(f"item {i}: label must be a bool, got {lab!r}")
        if pred is not None and not isinstance(pred, (bool, np.bool_)):
            raise ValueError(f"item {i}: prediction must be a bool or None, got {pred!r}")
    answered = [(bool(lab), bool(pred)) for lab, pred in zip(labels, predictions, strict=True) if pred is not None]
    n_excluded = len(labels) - len(answered)
    n = len(answered)
    pos = [pred for lab, pred in answered if lab]
    neg = [pred for lab, pred in answered if not lab]
    if not pos or not neg:
        missing = "positive" if not pos else "negative"
        return ScoreResult(
            None,
            None,
            None,
            n,
            reason=f"no answered {missing} items: balanced accuracy undefined",
            n_excluded=n_excluded,
        )
    tp, n_pos = sum(pos), len(pos)
    tn, n_neg = sum(not p for p in neg), len(neg)
    value = 0.5 * (tp / n_pos + tn / n_neg)
    if n_samples == 0:
        return ScoreResult(value, None, None, n, reason="no interval requested (n_samples=0)", n_excluded=n_excluded)
    rng = np.random.default_rng(seed)
    draws = 0.5 * (rng.beta(tp + 0.5, n_pos - tp + 0.5, n_samples) + rng.beta(tn + 0.5, n_neg - tn + 0.5, n_samples))
    lo, hi = _interval(draws, value, alpha, 0.0, 1.0)
    return ScoreResult(value, lo, hi, n, n_excluded=n_excluded, n_resamples=n_samples)


# --------------------------------------------------------------------------------------------------------- AUROC


def _as_scores_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels)
    if s.ndim != 1 or lab.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {lab.shape}")
    if s.shape != lab.shape:
        raise ValueError(f"{s.size} scores but {lab.size} labels")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"score {int(bad[0])} is not finite ({s[bad[0]]})")
    if lab.size and lab.dtype != np.bool_:
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("labels must be booleans (or 0/1)")
        lab = lab.astype(bool)
    return s, lab.astype(bool)


def auroc(
    scores: ArrayLike,
    labels: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ScoreResult:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting one half.

    Computed as the Mann-Whitney U statistic in O(n log n). The interval is a stratified percentile bootstrap
    (positives and negatives resampled separately, so every resample has both classes and is defined), widened to
    contain the estimate; it needs at least 2 items of each class. A missing class gives value None.
    """
    _check_common(n_boot, alpha)
    s, lab = _as_scores_labels(scores, labels)
    pos, neg = np.sort(s[lab]), np.sort(s[~lab])
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        missing = "positive" if n_pos == 0 else "negative"
        return ScoreResult(None, None, None, int(s.size), reason=f"no {missing} items: AUROC undefined")
    # For each positive: negatives strictly below, and at or below. Their mean counts ties as one half.
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    value = float(np.clip((below.sum() + at_or_below.sum()) / (2.0 * n_pos * n_neg), 0.0, 1.0))
    n = int(s.size)
    if n_boot == 0:
        return ScoreResult(value, None, None, n, reason="no interval requested (n_boot=0)")
    if n_pos < 2 or n_neg < 2:
        return ScoreResult(value, None, None, n, reason="a stratified bootstrap needs at least 2 items per class")

    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    # Resample by multinomial counts: with negatives reweighted, a positive's placement is a difference of
    # cumulative weights at its two search positions, so each resample costs O(n) without re-sorting.
    chunk = max(1, 2_000_000 // (n_pos + n_neg + 1))  # bound memory for large benchmark inputs
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        c_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=b).astype(np.float64)
        c_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=b).astype(np.float64)
        cum = np.zeros((b, n_neg + 1))
        np.cumsum(c_neg, axis=1, out=cum[:, 1:])
        placement = 0.5 * (cum[:, below] + cum[:, at_or_below])
        boots[start : start + b] = (c_pos * placement).sum(axis=1) / (n_pos * n_neg)
    lo, hi = _interval(np.clip(boots, 0.0, 1.0), value, alpha, 0.0, 1.0)
    return ScoreResult(value, lo, hi, n, n_resamples=n_boot)


def embedding_score(
    expl_vec: ArrayLike,
    context_vecs: ArrayLike,
    labels: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> ScoreResult:
    """AUROC of the cosine similarity between an explanation and activating (True) vs non-activating contexts.

    Vectors need not be normalized. A zero vector has no direction and raises ValueError naming it.
    """
    e = np.asarray(expl_vec, dtype=np.float64)
    c = np.asarray(context_vecs, dtype=np.float64)
    if e.ndim != 1 or c.ndim != 2 or c.shape[1] != e.size:
        raise ValueError(f"expected expl_vec (d,) and context_vecs (n, d), got {e.shape} and {c.shape}")
    if not (np.isfinite(e).all() and np.isfinite(c).all()):
        raise ValueError("embedding vectors must be finite")
    e_norm = float(np.linalg.norm(e))
    if e_norm == 0:
        raise ValueError("explanation vector is zero")
    c_norm = np.linalg.norm(c, axis=1)
    zero = np.flatnonzero(c_norm == 0)
    if zero.size:
        raise ValueError(f"context vector {int(zero[0])} is zero")
    cos = (c @ e) / (c_norm * e_norm)
    return auroc(cos, labels, n_boot=n_boot, seed=seed, alpha=alpha)


# -------------------------------------------------------------------------------------------- accuracy vs chance


def _beta_quantiles(a: float, b: float, qs: Sequence[float], grid: int = 20_001) -> list[float]:
    """Quantiles of Beta(a, b) for a, b >= 1/2, by integrating the density on x = sin^2(t), t in [0, pi/2].

    The substitution makes the integrand 2 sin^(2a-1) t cos^(2b-1) t, bounded and smooth for a, b >= 1/2 (no
    endpoint singularity), so a trapezoid rule on a fine grid gives the CDF to ~1e-6; computed in log space so that
    large a, b cannot underflow.
    """
    t = np.linspace(0.0, math.pi / 2, grid)

    def term(power: float, base: FloatArray) -> FloatArray:
        if power == 0:  # sin^0 = 1 even where sin is 0 (a = 1/2): 0 * log(0) would be NaN
            return np.zeros_like(base)
        with np.errstate(divide="ignore"):
            return power * np.log(base)

    logf = term(2 * a - 1, np.sin(t)) + term(2 * b - 1, np.cos(t))
    f = np.exp(logf - logf.max())
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]))])
    cdf /= cdf[-1]
    x = np.sin(t) ** 2
    return [float(np.interp(q, cdf, x)) for q in qs]


def binomial_p_value(k: int, n: int, p: float = 0.5) -> float:
    """Two-sided exact binomial test of k successes in n trials against success probability p: the probability
    under Binomial(n, p) of every outcome at most as likely as k (the 'minlike' rule of R's binom.test).
    1.0 when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if n == 0:
        return 1.0
    i = np.arange(n + 1)
    log_pmf = (
        np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(n + 1)])
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    pmf = np.exp(log_pmf)
    return float(min(1.0, pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()))


def choice_accuracy(correct: Sequence[bool | float | None], *, alpha: float = 0.05) -> ScoreResult:
    """Accuracy of forced choices (e.g. a judge picking the steered one of two texts), with a Jeffreys interval.

    A None item is undecided (a tie, an unparsable answer, a failed call): it is excluded and counted in
    `n_excluded`, never read as right or wrong. With no decided item the value is None with a reason. A float is a
    partial credit in [0, 1] of one item (a pair judged in both orders: the mean of the two); k is the sum.

    Interval: the equal-tailed quantiles of the Jeffreys posterior Beta(k + 1/2, n - k + 1/2), computed by
    deterministic quadrature (no sampling), with the usual boundary rule (Brown, Cai & DasGupta 2001): the lower end
    is 0 when k = 0 and the upper end 1 when k = n, so the interval always contains the estimate. Compare its ends
    with chance (0.5 for a pair) to call the accuracy significantly above or below it; `binomial_p_value` gives the
    exact test.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for i, c in enumerate(correct):
        credit = isinstance(c, (float, np.floating)) and 0.0 <= c <= 1.0
        if c is not None and not (isinstance(c, (bool, np.bool_)) or credit):
            raise ValueError(f"item {i}: must be a bool, a credit in [0, 1] or None, got {c!r}")
    decided = [float(c) for c in correct if c is not None]
    n_excluded = len(correct) - len(decided)
    n = len(decided)
    if n == 0:
        return ScoreResult(None, None, None, 0, reason="no decided items: accuracy undefined", n_excluded=n_excluded)
    k = sum(decided)
    lo, hi = _beta_quantiles(k + 0.5, n - k + 0.5, [alpha / 2, 1 - alpha / 2])
    value = k / n
    lo = 0.0 if k == 0 else min(lo, value)
    hi = 1.0 if k == n else max(hi, value)
    return ScoreResult(value, lo, hi, n, n_excluded=n_excluded)
