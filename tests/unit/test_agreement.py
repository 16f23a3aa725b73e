"""The agreement figures: Cohen's kappa, the Wilson interval and the calibration bins as pure functions (by value
and by property), and the whole page's figures from decisions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autointerp.review.agreement import agreement, calibration, cohen_kappa, wilson
from autointerp.store.reviews import Decision

labels = st.lists(st.sampled_from(["accept", "reject", "edit", "flag"]), min_size=1, max_size=40)


def test_kappa_by_value() -> None:
    # 2x2 table: both yes 20, a yes b no 5, a no b yes 10, both no 15 -> po 0.7, pe 0.5 -> kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["y", "n"], ["n", "y"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["y", "y"], ["y", "y"]) is None  # chance agreement is 1: undefined, never a made-up 1
    with pytest.raises(ValueError):
        cohen_kappa(["y"], [])


@given(labels, st.randoms())
def test_kappa_properties(a: list[str], rnd) -> None:  # type: ignore[no-untyped-def]
    b = [rnd.choice(["accept", "reject", "edit", "flag"]) for _ in a]
    k = cohen_kappa(a, b)
    assert k == cohen_kappa(b, a)  # symmetric
    if k is not None:
        assert -1.0 - 1e-12 <= k <= 1.0 + 1e-12
    same = cohen_kappa(a, a)
    assert same is None or same == pytest.approx(1.0)
    assert same is None or len(set(a)) > 1


def test_wilson_by_value() -> None:
    lo, hi = wilson(5, 10)  # type: ignore[misc]
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) is None
    lo0, hi0 = wilson(0, 20)  # type: ignore[misc]
    assert lo0 == 0.0 and 0 < hi0 < 0.2
    with pytest.raises(ValueError):
        wilson(3, 2)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_proportion(kn: tuple[int, int]) -> None:
    k, n = kn
    interval = wilson(k, n)
    assert interval is not None
    lo, hi = interval
    assert 0.0 <= lo <= k / n + 1e-12 and k / n - 1e-12 <= hi <= 1.0


@given(st.lists(st.tuples(st.floats(-3, 3), st.booleans()), max_size=60))
def test_calibration_counts_every_decision_once(pairs: list[tuple[float, bool]]) -> None:
    bins = calibration([v for v, _ in pairs], [a for _, a in pairs], [-1.0, 0.0, 0.5, 1.0])
    assert sum(b.n for b in bins) == len(pairs)
    assert sum(b.accepted for b in bins) == sum(a for _, a in pairs)
    for b in bins:
        assert (b.rate is None) == (b.n == 0)


def test_calibration_edges() -> None:
    bins = calibration([0.0, 0.49, 0.5, 1.0, 7.0, -9.0], [True, False, True, True, False, False], [0.0, 0.5, 1.0])
    assert [(b.n, b.accepted) for b in bins] == [(3, 1), (3, 2)]
    with pytest.raises(ValueError):
        calibration([0.1], [True], [1.0, 0.0])


def test_agreement_figures() -> None:
    ds = []
    for i in range(20):  # ann accepts the explanations scored 0.5 and up, bob agrees but on two
        score = i / 20
        ann = "accept" if score >= 0.5 else "reject"
        bob = ann if i not in (3, 15) else ("accept" if ann == "reject" else "edit")
        src = "neurons" if i % 2 else "sae-x"
        ds.append(Decision(i, i, src, "ann", ann, {"simulation": score}))
        ds.append(Decision(i, i, src, "bob", bob, {"simulation": score}))
    ds.append(Decision(99, 99, "neurons", "ann", "flag", {"simulation": 0.9}))
    a = agreement(ds, n_boot=200)
    assert a.n_decisions == 41 and a.n_reviewers == 2 and a.counts["flag"] == 1
    (sim,) = a.methods
    assert sim.n == 40  # the flag counts in neither class
    assert sim.auroc.value is not None and sim.auroc.value > 0.85
    (pair,) = a.pairs
    assert (pair.a, pair.b, pair.n) == ("ann", "bob", 20)  # the flag's explanation was decided by ann alone
    assert pair.agreement == pytest.approx(18 / 20)
    # kappa by hand: ann 10 accept / 10 reject; bob 10 accept (one is 3), 9 reject, 1 edit (15)
    po, pe = 18 / 20, (10 / 20) * (10 / 20) + (10 / 20) * (9 / 20)
    assert pair.kappa == pytest.approx((po - pe) / (1 - pe))
    neurons, sae = a.groups
    assert (neurons.name, neurons.n, sae.n) == ("neurons", 20, 20)
