"""How human review agrees with the scores and with itself: acceptance by score bin (a calibration curve), how well
each score predicts acceptance (AUROC with its bootstrap interval), agreement between reviewers on the explanations
both reviewed (Cohen's kappa), and acceptance of neurons vs SAE latents. Pure functions of decisions (numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from autointerp.methods import METHODS
from autointerp.metrics import ScoreResult, auroc
from autointerp.store.reviews import ACCEPTED, Decision, decisions_by_reviewer


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items: (observed - chance agreement) / (1 - chance).
    None when undefined: no items, or both raters gave one and the same label to every item (chance = 1)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} labels against {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    labels = set(a) | set(b)
    chance = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in labels)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion k/n (None for n = 0); stays inside [0, 1] and is defined at 0 and n."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes out of {n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    n: int  # decisions whose explanation's score falls in [lo, hi)
    accepted: int
    interval: tuple[float, float] | None  # Wilson 95 % interval of accepted / n

    @property
    def rate(self) -> float | None:
        return None if self.n == 0 else self.accepted / self.n


def calibration(values: Sequence[float], accepted: Sequence[bool], edges: Sequence[float]) -> list[Bin]:
    """Acceptance per score bin [edges[i], edges[i+1]); the last bin also holds its upper edge, and values outside
    the edges fall in the first or last bin."""
    if len(values) != len(accepted):
        raise ValueError(f"{len(values)} values against {len(accepted)} decisions")
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bin edges must be at least two and increasing, got {list(edges)}")
    nb = len(edges) - 1
    n = [0] * nb
    k = [0] * nb
    for v, ok in zip(values, accepted, strict=True):
        i = 0
        while i < nb - 1 and v >= edges[i + 1]:
            i += 1
        n[i] += 1
        k[i] += int(ok)
    return [Bin(edges[i], edges[i + 1], n[i], k[i], wilson(k[i], n[i])) for i in range(nb)]


def edges_of(method: str) -> tuple[float, ...]:
    """The calibration bins of a method, from its range and chance level (autointerp.methods); a method no longer
    registered (a score row of an old database) gets those of a 0-1 score with chance 0.5."""
    m = METHODS.get(method)
    return m.edges if m is not None else (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class MethodAgreement:
    method: str
    bins: list[Bin]
    auroc: ScoreResult  # the score as a predictor of acceptance
    n: int


@dataclass(frozen=True)
class ReviewerPair:
    a: str
    b: str
    n: int  # explanations both decided on
    kappa: float | None
    agreement: float | None  # the fraction decided alike


@dataclass(frozen=True)
class Group:
    name: str  # neurons | SAE latents
    n: int
    accepted: int
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class Agreement:
    n_decisions: int
    n_reviewers: int
    counts: dict[str, int]
    methods: list[MethodAgreement] = field(default_factory=list)
    pairs: list[ReviewerPair] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)


def agreement(decisions: Sequence[Decision], *, n_boot: int = 1000, seed: int = 0) -> Agreement:
    """The figures of the agreement page from each reviewer's latest decisions."""
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d.decision] = counts.get(d.decision, 0) + 1
    judged = [d for d in decisions if d.decision in ACCEPTED]
    methods = []
    for m in sorted({m for d in judged for m in d.scores}):
        have = [d for d in judged if m in d.scores]
        values = [d.scores[m] for d in have]
        ok = [ACCEPTED[d.decision] for d in have]
        methods.append(MethodAgreement(m, calibration(values, ok, edges_of(m)),
                                       auroc(values, ok, n_boot=n_boot, seed=seed), len(have)))  # fmt: skip
    by = decisions_by_reviewer(decisions)
    pairs = []
    for a, b in combinations(sorted(by), 2):
        both = sorted(set(by[a]) & set(by[b]))
        la, lb = [by[a][i] for i in both], [by[b][i] for i in both]
        same = sum(x == y for x, y in zip(la, lb, strict=True))
        pairs.append(ReviewerPair(a, b, len(both), cohen_kappa(la, lb), same / len(both) if both else None))
    groups = []
    for name, keep in (("neurons", lambda s: s == "neurons"), ("SAE latents", lambda s: s != "neurons")):
        g = [d for d in judged if keep(d.source)]
        k = sum(ACCEPTED[d.decision] for d in g)
        groups.append(Group(name, len(g), k, wilson(k, len(g))))
    return Agreement(len(decisions), len(by), counts, methods, pairs, groups)
