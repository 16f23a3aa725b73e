"""Scorers: an explanation + the feature's test records -> a score with an interval (numbers from autointerp.metrics).

SCORERS maps a method to its class, read from the registry of methods (autointerp.methods.METHODS: a new scorer is
its class and its line there): simulation (the simulator predicts per-token activations; Pearson
correlation pooled over tokens), detection (does each context activate?), fuzzing (are the marked tokens the
activating ones?), embedding (does the explanation sit closer to activating contexts?). Only the test split is
used. Which contexts count as activating, for the binary scorers and the embedding scorer: a record activates when its
maximum exceeds the feature's threshold, the larger of
- ACTIVE_FRACTION (1/10) of the feature's maximum (an integer activation of 2 or more on the 0-10 scale), and
- the lower median of the random test records' maxima, what a typical context reaches, when that is below
  TYPICAL_CAP (1/2) of the maximum. A feature whose typical context already reaches half its maximum (a dense on/off
  feature, or the planted capitalized-words rule) has no context-level split that says what it detects: the first
  rule alone decides, which mostly leaves it without negatives, hence undefined (with the reason).
For sparse features (SAE latents) the median is usually 0 and the first rule decides. Dense features (MLP neurons are
rarely exactly 0, and a 64-token context almost always reaches 1/10 of the maximum somewhere) would otherwise have
no negatives at all; with the median, "activates" means "fires more than a typical context", and at least half of
the random records are negatives by construction. (In a demo collection the median random maximum of 1,525 of
1,536 SmolLM2 layer-12 neurons was below half their maximum.)
- positives are the top and quantile test records that activate;
- negatives are the random test records that do not; random records that do are left out (counted in `details`).
A failed LLM call or an unparsable answer leaves its items out (counted in n_failed), never counted as "no".
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from autointerp.config import ScoreConfig, config_hash
from autointerp.jobs import Identity
from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, Failure
from autointerp.methods import METHODS, scored
from autointerp.metrics import ScoreResult, balanced_accuracy, correlation_score, embedding_score
from autointerp.prompts import Prompt
from autointerp.records import Example, marked, visible

ACTIVE_FRACTION = 0.1
TYPICAL_CAP = 0.5
# Stored in the scorers' config: changing the rule above changes their config hash, so old scores are not reused.
LABEL_RULE = "max(0.1 x max, lower median of random maxima if below 0.5 x max)"


@dataclass(frozen=True)
class EvalSet:
    """What a scorer sees: one explanation and its feature's test records."""

    explanation_id: int
    feature_id: int
    explanation: str
    max_act: float
    records: tuple[Example, ...]

    @property
    def threshold(self) -> float:
        rand = sorted(r.max_act for r in self.records if r.role == "random")
        typical = rand[(len(rand) - 1) // 2] if rand else 0.0
        if typical >= TYPICAL_CAP * self.max_act:  # a typical context fires strongly: no informative split
            typical = 0.0
        return max(ACTIVE_FRACTION * self.max_act, typical)

    def rng(self, salt: int) -> random.Random:
        """A random stream of this explanation on these records, from their content alone: the same item gets the
        same shuffles and fuzzed tokens whatever row ids it was stored under (two workers store in any order)."""
        key = f"{salt}:{self.explanation}:{[r.context for r in self.records]}:{self.max_act!r}"
        return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))

    def positives(self) -> list[Example]:
        return [r for r in self.records if r.role != "random" and r.max_act > self.threshold]

    def negatives(self) -> tuple[list[Example], int]:
        rand = [r for r in self.records if r.role == "random"]
        neg = [r for r in rand if r.max_act <= self.threshold]
        return neg, len(rand) - len(neg)


@dataclass(frozen=True)
class ScoreOutcome:
    status: str  # ok | undefined | failed
    value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0
    n_failed: int = 0
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, res: ScoreResult, n_failed: int = 0, **details: Any) -> ScoreOutcome:
        status = "ok" if res.value is not None else "undefined"
        return cls(status, res.value, res.ci_low, res.ci_high, res.n, n_failed, res.reason, details)


@dataclass(frozen=True)
class ScorerId(Identity):
    """What produced a score: the method beside the model, prompt and config (jobs.Identity)."""

    method: str = ""

    def key(self) -> dict[str, str]:
        """The identity's part of a score's unique key (beside the explanation)."""
        return {"method": self.method, "model": self.model, "prompt_hash": self.prompt_hash,
                "config_hash": self.config_hash}  # fmt: skip


class Scorer(ABC):
    """A scorer of one method; the extension point for a new score method.

    A method is described (kind, range, chance, label, whether it needs an LLM, how it ranks) by its line in
    autointerp.methods.METHODS, which also says where this class is: adding a scorer is this class and that line.
    `score` takes one EvalSet per explanation (its held-out activating and random examples) and returns one
    ScoreOutcome each, in order; a failed call or answer is a failed outcome (stored as a failure, never a zero).
    `identity` names what produced the scores; `clients` declares the LLM clients it calls (the job's budget)."""

    method: ClassVar[str]

    @classmethod
    @abstractmethod
    def build(cls, cfg: ScoreConfig, client: LLMClient | None) -> Scorer:
        """The scorer for a run; `client` is the stage's LLM client (None for a method that needs no LLM)."""

    @property
    @abstractmethod
    def identity(self) -> ScorerId: ...

    @abstractmethod
    def score(self, items: Sequence[EvalSet]) -> list[ScoreOutcome]: ...

    def clients(self) -> list[LLMClient]:
        """The LLM clients it calls (none for an LLM-free scorer): the job counts their spend."""
        return []


def _text(ex: Example) -> str:
    return visible("".join(ex.tokens)).strip()


_LIST = re.compile(r"\[[\s\d,]*\]")


def parse_binary_list(raw: str, n: int) -> list[bool]:
    """The first JSON list of exactly n 0/1 values in the answer; anything else is an error."""
    for m in _LIST.finditer(raw):
        try:
            vals = json.loads(m.group(0))
        except ValueError:  # JSONDecodeError, or a number past CPython's int-conversion limit
            continue
        if len(vals) == n and all(v in (0, 1) for v in vals):
            return [bool(v) for v in vals]
    raise ValueError(f"expected a JSON list of {n} zeros and ones, got {raw.strip()[:200]!r}")


class _BinaryLLMScorer(Scorer):
    """Shared by detection and fuzzing: batches of numbered texts, one JSON list of 0/1 per batch."""

    prompt_name: ClassVar[str]

    def __init__(self, cfg: ScoreConfig, client: LLMClient, prompt: Prompt) -> None:
        self.cfg = cfg
        self.client = client
        self.prompt = prompt

    @classmethod
    def build(cls, cfg: ScoreConfig, client: LLMClient | None) -> Scorer:
        from autointerp.prompts import load_prompt

        assert client is not None
        return cls(cfg, client, load_prompt(cls.prompt_name))

    @property
    def identity(self) -> ScorerId:
        conf = self.cfg.model_dump(include={"batch", "max_per_role", "seed", "n_boot"})
        conf["labels"] = LABEL_RULE
        return ScorerId(self.client.name, self.prompt.name, self.prompt.hash, config_hash(conf), conf, self.method)

    def clients(self) -> list[LLMClient]:
        return [self.client]

    @abstractmethod
    def items(self, ts: EvalSet) -> tuple[list[str], list[bool], dict[str, Any]]: ...

    def score(self, items: Sequence[EvalSet]) -> list[ScoreOutcome]:
        plans = []
        reqs: list[ChatRequest] = []
        for ts in items:
            texts, labels, details = self.items(ts)
            order = list(range(len(texts)))
            ts.rng(self.cfg.seed).shuffle(order)  # mix the classes within batches
            batches = [order[i : i + self.cfg.batch] for i in range(0, len(order), self.cfg.batch)]
            plans.append((texts, labels, details, batches, len(reqs)))
            for b in batches:
                body = "".join(f"Text {j + 1}: {texts[k]}\n" for j, k in enumerate(b))
                msgs = self.prompt.render(explanation=ts.explanation, texts=body, n=str(len(b)))
                reqs.append(ChatRequest(messages=msgs, max_tokens=8 + 4 * len(b)))
        answers = self.client.chat_many(reqs)
        out = []
        for texts, labels, details, batches, first in plans:
            preds: list[bool | None] = [None] * len(texts)
            errors: list[str] = []
            for bi, b in enumerate(batches):
                ans = answers[first + bi]
                if isinstance(ans, Failure):
                    errors.append(f"LLM call failed: {ans.error}")
                    continue
                try:
                    for k, v in zip(b, parse_binary_list(ans.text, len(b)), strict=True):
                        preds[k] = v
                except ValueError as exc:
                    errors.append(str(exc))
            n_failed = sum(p is None for p in preds)
            if texts and n_failed == len(texts):
                out.append(ScoreOutcome("failed", n_failed=n_failed, reason="; ".join(errors[:3]), details=details))
                continue
            res = balanced_accuracy(labels, preds, seed=self.cfg.seed)
            out.append(ScoreOutcome.of(res, n_failed, errors=errors[:5], **details))
        return out


class DetectionScorer(_BinaryLLMScorer):
    method = "detection"
    prompt_name = "detect"

    def items(self, ts: EvalSet) -> tuple[list[str], list[bool], dict[str, Any]]:
        pos = ts.positives()
        neg, excluded = ts.negatives()
        texts = [_text(r) for r in pos + neg]
        return texts, [True] * len(pos) + [False] * len(neg), {"random_excluded": excluded, "threshold": ts.threshold}


def fuzzed(ex: Example, rng: random.Random, mark_fraction: float = 0.5) -> str:
    """The record with as many marks as it really has, put on tokens that are not the marked ones."""
    real = marked(ex.acts, mark_fraction)
    k = sum(real)
    others = [i for i, m in enumerate(real) if not m and ex.tokens[i].strip()]
    chosen = set(rng.sample(others, min(k, len(others))))
    return "".join(
        (f"{visible(t[: len(t) - len(t.lstrip())])}<<{visible(t.lstrip())}>>" if i in chosen else visible(t))
        for i, t in enumerate(ex.tokens)
    ).strip()


class FuzzingScorer(_BinaryLLMScorer):
    method = "fuzzing"
    prompt_name = "fuzz"

    def items(self, ts: EvalSet) -> tuple[list[str], list[bool], dict[str, Any]]:
        pos = ts.positives()
        rng = ts.rng(self.cfg.seed * 7919)
        right = [r.marked_text().strip() for r in pos]
        wrong = [fuzzed(r, rng) for r in pos]
        return right + wrong, [True] * len(right) + [False] * len(wrong), {}


class EmbeddingScorer(Scorer):
    method = "embedding"

    def __init__(self, cfg: ScoreConfig, embedder: Any) -> None:
        self.cfg = cfg
        self.embedder = embedder

    @classmethod
    def build(cls, cfg: ScoreConfig, client: LLMClient | None) -> Scorer:  # noqa: ARG003
        from autointerp.score.embed import Embedder

        return cls(cfg, Embedder())

    @property
    def identity(self) -> ScorerId:
        conf = self.cfg.model_dump(include={"max_per_role", "seed", "n_boot", "embed_window"})
        conf["labels"] = LABEL_RULE
        return ScorerId(f"embed:{self.embedder.name}", "", "", config_hash(conf), conf, self.method)

    def _window(self, ex: Example, rng: random.Random, at_peak: bool) -> str:
        """The tokens around the peak (activating) or around a random position (not activating): a whole context
        mixes many topics, a short window is about what the feature saw."""
        w = self.cfg.embed_window
        if w <= 0 or len(ex.tokens) <= w:
            return _text(ex)
        centre = int(np.argmax(ex.acts)) if at_peak else rng.randrange(len(ex.tokens))
        start = min(max(0, centre - (3 * w) // 4), len(ex.tokens) - w)
        return visible("".join(ex.tokens[start : start + w])).strip()

    def score(self, items: Sequence[EvalSet]) -> list[ScoreOutcome]:
        out = []
        for ts in items:
            pos = ts.positives()
            neg, excluded = ts.negatives()
            rng = ts.rng(self.cfg.seed)
            windows = [self._window(r, rng, True) for r in pos] + [self._window(r, rng, False) for r in neg]
            texts = [ts.explanation, *windows]
            vecs = self.embedder.encode(texts)
            labels = np.array([1] * len(pos) + [0] * len(neg))
            res = embedding_score(vecs[0], vecs[1:], labels, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
            out.append(ScoreOutcome.of(res, random_excluded=excluded, threshold=ts.threshold))
        return out


class SimulationScorer(Scorer):
    method = "simulation"

    def __init__(self, cfg: ScoreConfig, simulator: Any) -> None:
        self.cfg = cfg
        self.simulator = simulator

    @classmethod
    def build(cls, cfg: ScoreConfig, client: LLMClient | None) -> Scorer:
        from autointerp.score.simulate import make_simulator

        assert client is not None
        return cls(cfg, make_simulator(client, prefer=cfg.simulator))

    def clients(self) -> list[LLMClient]:
        return [self.simulator.client]

    @property
    def identity(self) -> ScorerId:
        sid = self.simulator.identity
        conf = self.cfg.model_dump(include={"max_per_role", "seed", "n_boot"})
        conf["simulator"] = sid.method
        return ScorerId(sid.model, sid.prompt, sid.prompt_hash, config_hash(conf), conf, self.method)

    def score(self, items: Sequence[EvalSet]) -> list[ScoreOutcome]:
        out = []
        for ts in items:
            preds = self.simulator.simulate(ts.explanation, [r.tokens for r in ts.records])
            real, sim, kept, errors = [], [], [], []
            for i, (r, p) in enumerate(zip(ts.records, preds, strict=True)):
                if isinstance(p, list):
                    real.append(np.asarray(r.acts, dtype=np.float64))
                    sim.append(np.asarray(p, dtype=np.float64))
                    kept.append(i)
                else:
                    errors.append(p.error)
            n_failed = len(ts.records) - len(kept)
            if not kept:
                reason = "; ".join(errors[:3]) or "no test records"
                out.append(ScoreOutcome("failed", n_failed=n_failed, reason=reason))
                continue
            res = correlation_score(real, sim, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
            details = {
                "records": [
                    {"context": ts.records[i].context, "predicted": [round(float(x), 3) for x in s]}
                    for i, s in zip(kept, sim, strict=True)
                ],
                "errors": errors[:5],
            }
            out.append(ScoreOutcome.of(res, n_failed, **details))
        return out


class _Scorers(Mapping[str, type[Scorer]]):
    """Method name -> scorer class, for each method of autointerp.methods.METHODS that has a scorer, read at each
    look-up (so a method registered there is here too); a "module:Class" is imported when first asked for."""

    def __getitem__(self, name: str) -> type[Scorer]:
        m = METHODS.get(name)
        if m is None or m.scorer is None:
            raise KeyError(name)
        where = m.scorer
        if isinstance(where, str):
            module, _, attr = where.partition(":")
            where = getattr(importlib.import_module(module), attr)
        if not (isinstance(where, type) and issubclass(where, Scorer) and where.method == name):
            raise TypeError(f"score method {name!r}: {m.scorer!r} is not a Scorer class with method {name!r}")
        return where

    def __iter__(self) -> Iterator[str]:
        return iter(scored())

    def __len__(self) -> int:
        return len(scored())


SCORERS: Mapping[str, type[Scorer]] = _Scorers()
