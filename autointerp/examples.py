"""Records made readable for LLM prompts: decoded tokens, 0-10 integer activations and <<marked>> spans.

One rounding rule everywhere (explainer prompts, simulator targets, the review page):
    integer activation = ceil(10 * a / feature_max), clipped to 0..10, and 0 for a <= 0.
Any positive activation shows as at least 1 (delphi's rule, not OpenAI's floor), so examples sampled from low
activation quantiles still show where they fire. A token is *marked* when it is positive and reaches
`mark_fraction` (default 1/2) of its own record's maximum: the marks point at each example's peaks, while the
integers tell how strong those peaks are relative to the feature's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MARK_OPEN, MARK_CLOSE = "<<", ">>"


def quantize(acts: Sequence[float] | np.ndarray, feature_max: float) -> list[int]:
    a = np.asarray(acts, dtype=np.float64)
    if feature_max <= 0:
        return [0] * len(a)
    q = np.ceil(10.0 * np.maximum(a, 0.0) / feature_max)
    return [int(x) for x in np.clip(q, 0, 10)]


def marked(acts: Sequence[float] | np.ndarray, mark_fraction: float = 0.5) -> list[bool]:
    a = np.asarray(acts, dtype=np.float64)
    top = float(a.max()) if len(a) else 0.0
    if top <= 0:
        return [False] * len(a)
    return [bool(x > 0 and x >= mark_fraction * top) for x in a]


def visible(token: str) -> str:
    """A token as shown inside a one-line example: newlines and tabs spelled out so lines stay lines."""
    return token.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


@dataclass(frozen=True)
class Example:
    """One record ready for a prompt: decoded tokens (concatenating to the context's text) and activations."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    role: str
    max_act: float
    context: int = -1  # the context's index in its corpus slice (-1: not from the database)

    def window(self, size: int) -> Example:
        """At most `size` tokens around the peak (three quarters before it: what precedes a token explains it)."""
        n = len(self.tokens)
        if size <= 0 or n <= size:
            return self
        peak = int(np.argmax(self.acts))
        start = min(max(0, peak - (3 * size) // 4), n - size)
        return Example(
            self.tokens[start : start + size], self.acts[start : start + size], self.role, self.max_act, self.context
        )

    def marked_text(self, mark_fraction: float = 0.5) -> str:
        """The text with consecutive marked tokens merged into one <<span>>."""
        out: list[str] = []
        inside = False
        for tok, m in zip(self.tokens, marked(self.acts, mark_fraction), strict=True):
            if m and not inside:
                # Leading whitespace stays outside the mark: " <<Union>>", as a reader would write it.
                lead = tok[: len(tok) - len(tok.lstrip())]
                out.append(visible(lead) + MARK_OPEN)
                tok = tok[len(lead) :]
                inside = True
            elif not m and inside:
                out.append(MARK_CLOSE)
                inside = False
            out.append(visible(tok))
        if inside:
            out.append(MARK_CLOSE)
        return "".join(out)

    def marked_values(self, feature_max: float, mark_fraction: float = 0.5) -> list[tuple[str, int]]:
        q = quantize(self.acts, feature_max)
        pairs = zip(self.tokens, q, marked(self.acts, mark_fraction), strict=True)
        return [(visible(t.strip() or t), v) for t, v, m in pairs if m]


@dataclass(frozen=True)
class FeatureExamples:
    """What an explainer sees of one feature: its train-split examples and its statistics."""

    feature_id: int
    key: str
    max_act: float
    density: float
    examples: tuple[Example, ...]

    @property
    def n_activating(self) -> int:
        return sum(1 for e in self.examples if e.max_act > 0)


def format_examples(fx: FeatureExamples, mark_fraction: float = 0.5) -> str:
    """The examples block of the explainer prompt: one numbered line of marked text, one of marked activations."""
    lines = []
    for i, ex in enumerate(fx.examples, 1):
        lines.append(f"Example {i}: {ex.marked_text(mark_fraction)}")
        vals = ex.marked_values(fx.max_act, mark_fraction)
        shown = ", ".join(f'"{t}" {v}' for t, v in vals) if vals else "none"
        lines.append(f"Activations: {shown}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
