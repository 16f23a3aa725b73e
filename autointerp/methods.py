"""Score methods described once: what each figure is, its range and chance level, its short label, whether it needs
an LLM, whether a verdict may rest on it, and where its scorer is. A leaf (standard library only), so the config,
the store's views and filters, the judge, the review pages, render and export read it without importing a scorer.

Adding a scorer: write its class (a `autointerp.score.scorers.Scorer`) and add its `Method` line to METHODS; every
reader takes the method from here. All methods rank the same way: a higher value is a better explanation (a scorer
whose natural figure is a loss stores 1 - loss or its negation), so an explanation's best score is its maximum
everywhere (SQL `max`, the queue's lowest-first order, the judge's evidence).

Two derived views name what the old constants meant: `evidence()`, the methods a verdict may rest on (best tier
first), and `non_causal()`, every method that is not the causal check (the review queue compares their scores).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["correlation", "classification", "causal"]
"""correlation: predicted against real activations (a Pearson correlation; a verdict needs intervene.min_simulation);
classification: how well the explanation tells activating contexts or tokens from others (balanced accuracy,
AUROC; intervene.min_classification); causal: a judge picks the steered text from the explanation alone."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")  # a method name is a column of the SQL views


@dataclass(frozen=True)
class Method:
    """One score method. `scorer` is where the score stage finds its class: "module:Class" (imported when first
    needed, so describing a method imports nothing) or the class itself; None when another stage writes its rows
    (intervention). `evidence` is its tier for verdicts (0 first; a verdict rests on the best score of the first
    tier that has one), None when a verdict never rests on it."""

    name: str
    kind: Kind
    lo: float
    hi: float
    chance: float  # what an explanation that says nothing scores
    short: str  # label in terminal tables
    needs_llm: bool
    scorer: object = None
    evidence: int | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"score method name {self.name!r}: lower-case letters, digits and _, at most 32")
        if not self.lo <= self.chance < self.hi:
            raise ValueError(f"score method {self.name!r}: needs lo <= chance < hi, got {self.lo}, {self.chance}, "
                             f"{self.hi}")  # fmt: skip

    @property
    def edges(self) -> tuple[float, ...]:
        """Bins of the agreement page's calibration curve: below chance as one bin, chance to the top in five."""
        step = (self.hi - self.chance) / 5
        above = tuple(round(self.chance + k * step, 9) for k in range(6))
        return above if self.lo == self.chance else (self.lo, *above)


_S = "autointerp.score.scorers"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("simulation", "correlation", -1.0, 1.0, 0.0, "sim", True, f"{_S}:SimulationScorer", evidence=0),
        Method("detection", "classification", 0.0, 1.0, 0.5, "det", True, f"{_S}:DetectionScorer", evidence=1),
        Method("fuzzing", "classification", 0.0, 1.0, 0.5, "fuzz", True, f"{_S}:FuzzingScorer", evidence=1),
        Method("embedding", "classification", 0.0, 1.0, 0.5, "emb", False, f"{_S}:EmbeddingScorer"),
        Method("intervention", "causal", 0.0, 1.0, 0.5, "causal", True),
    )
}
DEFAULT = "simulation"
"""The method that lists sort by, score bounds apply to and the views' best explanation is chosen by, when none is
named."""


class UnknownMethod(ValueError):
    pass


def names() -> tuple[str, ...]:
    """Every method, in registry order."""
    return tuple(METHODS)


def get(name: str) -> Method:
    """The method called `name`; an unknown name is an error that lists the known ones."""
    m = METHODS.get(name)
    if m is None:
        raise UnknownMethod(f"unknown score method {name!r}: choose from {', '.join(METHODS)}")
    return m


def scored() -> tuple[str, ...]:
    """The methods the score stage runs (those with a scorer): what `score.methods` accepts, all by default."""
    return tuple(n for n, m in METHODS.items() if m.scorer is not None)


def evidence() -> tuple[str, ...]:
    """The methods a verdict may rest on, best tier first."""
    ranked = [m for m in METHODS.values() if m.evidence is not None]
    return tuple(m.name for m in sorted(ranked, key=lambda m: m.evidence or 0))


def non_causal() -> tuple[str, ...]:
    """Every method that is not a causal check: the scores the review queue compares to find scorers disagreeing."""
    return tuple(n for n, m in METHODS.items() if m.kind != "causal")


def short(name: str) -> str:
    """The label of a method in terminal tables (an unknown method, e.g. in an old database, by its name)."""
    m = METHODS.get(name)
    return m.short if m is not None else name


def needs_llm(methods: Iterable[str]) -> bool:
    """Whether any of the methods calls an LLM (unknown names raise)."""
    return any(get(n).needs_llm for n in methods)
