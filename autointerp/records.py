"""Records, shared by explain, score and intervene: which stored records a stage shows (train for explaining,
test for scoring), and how they are made readable: for LLM prompts (decoded tokens, 0-10 integer activations and
<<marked>> spans) and for people (`glyphs`).

One rounding rule everywhere (explainer prompts, simulator targets, the review page):
    integer activation = ceil(10 * a / feature_max), clipped to 0..10, and 0 for a <= 0.
Any positive activation shows as at least 1 (delphi's rule, not OpenAI's floor), so examples sampled from low
activation quantiles still show where they fire. A token is *marked* when it is positive and reaches
`mark_fraction` (default 1/2) of its own record's maximum: the marks point at each example's peaks, while the
integers tell how strong those peaks are relative to the feature's maximum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from autointerp.store.engine import Store

Decode = Callable[[Sequence[int]], list[str]]

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


# Newline and tab as arrows; the other C0 controls and DEL as their Unicode control pictures (U+2400 + code,
# U+2421); the C1 controls and the line / paragraph separators, which have no picture, as escapes.
_GLYPHS = {"\n": "⏎", "\t": "⇥", "\x7f": "␡"}
_GLYPHS |= {chr(c): chr(0x2400 + c) for c in range(0x20) if chr(c) not in _GLYPHS}
_GLYPHS |= {chr(c): f"\\x{c:02x}" for c in range(0x80, 0xA0)} | {"\u2028": "\\u2028", "\u2029": "\\u2029"}
_GLYPH_TABLE = str.maketrans(_GLYPHS)


def glyphs(token: str) -> str:
    """A token as people see it (terminal and review page): newline ⏎, tab ⇥, every other control character as a
    visible mark, so no token moves the cursor, breaks a line or vanishes. Prompts spell tokens with `visible`."""
    return token.translate(_GLYPH_TABLE)


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


# ----------------------------------------------------------------------------------------------------
# Which records a stage shows


def train_records(records: Sequence[Any], n_top: int, n_quantile: int) -> list[Any]:
    """Train records for the explainer: the top n_top by rank, then n_quantile spread over bins (highest first)."""
    train = [r for r in records if r.split == "train"]
    top = sorted((r for r in train if r.role == "top"), key=lambda r: r.rank)[:n_top]
    by_bin: dict[int, list[Any]] = defaultdict(list)
    for r in sorted((r for r in train if r.role == "quantile"), key=lambda r: r.rank):
        by_bin[r.bin if r.bin is not None else 0].append(r)
    quant: list[Any] = []
    bins = sorted(by_bin, reverse=True)
    while len(quant) < n_quantile and any(by_bin[b] for b in bins):
        for b in bins:
            if by_bin[b] and len(quant) < n_quantile:
                quant.append(by_bin[b].pop(0))
    return top + quant


def test_records(records: Sequence[Any], max_per_role: int) -> list[Any]:
    """The test split, at most max_per_role per role (top by rank, quantile spread over bins, random)."""
    test = [r for r in records if r.split == "test"]
    out: list[Any] = []
    for role in ("top", "quantile", "random"):
        group = sorted((r for r in test if r.role == role), key=lambda r: (r.rank, -(r.bin or 0)))
        if role == "quantile":  # round robin over bins so every activation level is scored
            by_bin: dict[int, list[Any]] = {}
            for r in group:
                by_bin.setdefault(r.bin or 0, []).append(r)
            group = [
                lane[i]
                for i in range(max(map(len, by_bin.values()), default=0))
                for lane in by_bin.values()
                if i < len(lane)
            ]
        out += group[:max_per_role]
    return out


test_records.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, whatever its name


def as_example(record: Any, decode: Decode) -> Example:
    """A stored record (store.queries.RecordView) as an Example with decoded tokens."""
    acts = tuple(float(a) for a in record.acts)
    return Example(tuple(decode(record.token_ids)), acts, record.role, float(record.max_act), record.context_idx)


def feature_examples(
    feature_id: int,
    key: str,
    max_act: float,
    density: float,
    records: Sequence[Any],
    decode: Decode,
    window: int = 0,
) -> FeatureExamples:
    exs = tuple(as_example(r, decode).window(window) for r in records)
    return FeatureExamples(feature_id, key, float(max_act), float(density), exs)


# ----------------------------------------------------------------------------------------------------
# Decoding stored token ids


@lru_cache(maxsize=4)
def _tokenizer(source: str) -> Any:
    from autointerp.subject.files import load_tokenizer

    return load_tokenizer(source)


def decoder(store: Store, model_id: str) -> Decode:
    """Token ids -> their strings (BPE artefacts decoded) with the tokenizer of a stored subject model (loaded once
    per model, no weights)."""
    from autointerp.store.queries import model_source
    from autointerp.subject.tokens import token_strings

    tok = _tokenizer(model_source(store, model_id) or model_id)
    return lambda ids: token_strings(tok, ids)
