"""Planted features: synthetic features whose true rule is known, computed from the corpus tokens alone.

They are collected as one more source (`planted`) by the real collector, then explained and scored by the real
pipeline, so a benchmark can ask whether explainers find the rule and whether scorers prefer the true description
over mismatched ones (bench/planted.py). Each rule fires on the tokens it describes; its activation varies with a
hash of the token id (between 0.5 and 1.5), so that activation quantiles differ and the records are not flat.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PLANTED = "planted"


@dataclass(frozen=True)
class Rule:
    name: str
    description: str  # the true explanation, written as a person would
    matches: Callable[[str], bool]  # on the decoded token string


def _words(*ws: str) -> Callable[[str], bool]:
    vocab = {w.lower() for w in ws}
    return lambda t: t.strip().lower() in vocab


RULES: tuple[Rule, ...] = (
    Rule("digits", "numbers and digits", lambda t: bool(re.search(r"\d", t))),
    Rule(
        "capitalized",
        "capitalized words",
        lambda t: bool(re.fullmatch(r"[A-Z][a-z]+", t.strip())) and t.startswith(" "),
    ),
    Rule(
        "places",
        "names of countries and places",
        _words(
            "america",
            "mexico",
            "canada",
            "china",
            "russia",
            "japan",
            "germany",
            "france",
            "england",
            "britain",
            "cuba",
            "spain",
            "iraq",
            "iran",
            "korea",
            "vietnam",
            "texas",
            "california",
            "virginia",
            "europe",
            "asia",
            "africa",
            "ohio",
            "israel",
            "afghanistan",
            "panama",
            "philippines",
            "washington",
            "york",
            "india",
        ),
    ),
    Rule("negation", "negation words such as not, no and never", _words("not", "no", "never", "n't", "nor", "neither")),
    Rule("sentence_end", "punctuation that ends a sentence", lambda t: t.strip() in (".", "!", "?")),
    Rule(
        "war",
        "words about war and the military",
        _words(
            "war",
            "wars",
            "army",
            "navy",
            "troops",
            "military",
            "soldiers",
            "enemy",
            "enemies",
            "forces",
            "weapons",
            "battle",
            "defense",
            "armed",
            "combat",
            "veterans",
            "invasion",
            "attack",
            "sailors",
            "marines",
        ),
    ),
)


def rule_names() -> list[str]:
    return [r.name for r in RULES]


class PlantedActivations:
    """Token ids -> [B, P, len(RULES)] activations, from a lookup table built once over the vocabulary."""

    def __init__(self, decode: Callable[[Sequence[int]], list[str]], vocab_size: int, rules: Sequence[Rule] = RULES):
        self.rules = tuple(rules)
        strings = [decode([i])[0] for i in range(vocab_size)]
        table = np.zeros((vocab_size, len(self.rules)), dtype=np.float32)
        ids = np.arange(vocab_size, dtype=np.uint64)
        wobble = 0.5 + ((ids * np.uint64(2654435761)) % np.uint64(1000)).astype(np.float32) / 1000.0
        for j, rule in enumerate(self.rules):
            hits = np.fromiter((rule.matches(s) for s in strings), dtype=bool, count=vocab_size)
            table[hits, j] = wobble[hits]
        self.table = torch.from_numpy(table)

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table[token_ids.long().cpu()]


def planted_for(tokenizer: Any) -> PlantedActivations:
    from autointerp.subject.tokens import token_strings

    return PlantedActivations(lambda ids: token_strings(tokenizer, ids), len(tokenizer))
