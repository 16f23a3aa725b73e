"""Explainers: a feature's train-split examples -> one short phrase, from an LLM or from the token baseline.

Explainers live in a registry (EXPLAINERS), the only place their names are looked up; each builds itself for a run
(`Explainer.build`, as scorers do). Each produces an Outcome per feature: `ok` with a text, `failed` with
the error and the raw answer (an unparsable or empty answer is never stored as an explanation), or `skipped` with
the reason (too few activating examples, dead feature). Only the train split is read; the test split is the
scorer's.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

from autointerp.config import ExplainConfig, config_hash
from autointerp.jobs import Identity
from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, Failure
from autointerp.prompts import Prompt
from autointerp.records import FeatureExamples, format_examples

if TYPE_CHECKING:
    from autointerp.store.engine import Store


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | failed | skipped
    text: str | None = None
    error: str | None = None
    raw: str | None = None
    n_records: int = 0
    prompt_tokens: int = 0
    attempts: int = 1


@dataclass(frozen=True)
class ExplainerId(Identity):
    """What produced an explanation: the explainer's name beside the model, prompt and config (jobs.Identity)."""

    explainer: str = ""

    def key(self) -> dict[str, str]:
        """The identity's part of an explanation's unique key (beside the feature)."""
        return {"explainer": self.explainer, "model": self.model, "prompt_hash": self.prompt_hash,
                "config_hash": self.config_hash}  # fmt: skip


class ExplanationParseError(ValueError):
    pass


class _Answer(BaseModel):
    text: str = Field(min_length=3, max_length=200)

    @field_validator("text")
    @classmethod
    def _has_words(cls, v: str) -> str:
        if not re.search(r"[A-Za-z0-9]", v):
            raise ValueError("no words in the explanation")
        return v


_LABEL = re.compile(r"explanation\s*:\s*", re.IGNORECASE)
# Small models often echo the prompt's format instead of answering: that is not an explanation.
_ECHO = re.compile(r'(^example\s*\d+)|(<<|>>)|("[^"]*"\s+\d+\s*(,|$))|(^activations\s*:)', re.IGNORECASE)
# Boilerplate openings that carry no content ("The marked tokens have in common that they are ...").
_PREAMBLE = re.compile(r"^(the )?(marked )?tokens (all )?(have in common|share)( that)?( they)?( are)?( all)?\s*", re.I)


def parse_explanation(raw: str, finish_reason: str = "stop") -> str:
    """The phrase after the last 'Explanation:' (or the first non-empty line), cleaned and validated.

    A truncated answer (the model hit max_tokens before ending its line) is refused: half a phrase is not an
    explanation.
    """
    text = raw.strip()
    found = list(_LABEL.finditer(text))
    if found:
        text = text[found[-1].end() :]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ExplanationParseError("empty answer")
    if finish_reason == "length" and len(lines) == 1 and not raw.rstrip().endswith((".", "\n")):
        raise ExplanationParseError("answer truncated at max_tokens")
    phrase = re.sub(r"\s+", " ", lines[0]).strip()
    if _ECHO.search(phrase):
        raise ExplanationParseError(f"answer repeats the prompt's example format instead of explaining: {phrase!r}")
    while len(phrase) > 1 and phrase[0] == phrase[-1] and phrase[0] in "\"'`*":
        phrase = phrase[1:-1].strip()  # a phrase wrapped in quotes; quotes inside it are kept
    phrase = _PREAMBLE.sub("", phrase).rstrip(".").strip()
    try:
        return _Answer(text=phrase).text
    except ValidationError as exc:
        raise ExplanationParseError(f"invalid explanation {phrase!r}: {exc.errors()[0]['msg']}") from exc


class Explainer(ABC):
    """A way of writing one explanation per feature from its examples; the extension point for a new explainer.

    To add one: subclass it, set `name` (and `needs_llm = False` if it calls no LLM), implement `build`,
    `identity` and `explain`, and add its `name -> "module:Class"` line to EXPLAINERS. `explain` returns one
    Outcome per feature, in order: a refused call or an unparsable answer is an Outcome with status "error" (stored
    as a failure, never as an explanation). `identity` says what produced the rows (model, prompt, config), which
    is what makes a rerun find them done. Declare the LLM clients it calls in `clients` (the job's budget counts
    their spend) and the requests it would send in `requests` (what `run --dry-run` prices)."""

    name: ClassVar[str]
    needs_llm: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def build(cls, cfg: ExplainConfig, store: Store, client: LLMClient | None) -> Explainer:
        """The explainer for a run; `client` is the stage's LLM client (None when `needs_llm` is False)."""

    @property
    @abstractmethod
    def identity(self) -> ExplainerId: ...

    @abstractmethod
    def explain(self, features: Sequence[FeatureExamples]) -> list[Outcome]: ...

    def clients(self) -> list[LLMClient]:
        """The LLM clients it calls (none for an LLM-free explainer): the job counts their spend."""
        return []

    def requests(self, features: Sequence[FeatureExamples]) -> list[ChatRequest]:  # noqa: ARG002 (none by default)
        """The requests `explain` would send for these features, built without sending them (the dry run)."""
        return []


def _too_few(fx: FeatureExamples, cfg: ExplainConfig) -> Outcome | None:
    if fx.max_act <= 0:
        return Outcome("skipped", error="dead feature: it never activates on the corpus slice")
    if fx.n_activating < cfg.min_examples:
        return Outcome(
            "skipped",
            error=f"only {fx.n_activating} activating train examples (min_examples = {cfg.min_examples})",
            n_records=len(fx.examples),
        )
    return None


class LLMExplainer(Explainer):
    name = "llm"

    def __init__(self, cfg: ExplainConfig, client: LLMClient, prompt: Prompt) -> None:
        self.cfg = cfg
        self.client = client
        self.prompt = prompt

    @classmethod
    def build(cls, cfg: ExplainConfig, store: Store, client: LLMClient | None) -> Explainer:  # noqa: ARG003
        from autointerp.prompts import load_prompt

        if client is None:
            raise ValueError("the llm explainer needs an LLM client")
        return cls(cfg, client, load_prompt(cfg.prompt))

    @property
    def identity(self) -> ExplainerId:
        conf = self.cfg.model_dump(include={"n_top", "n_quantile", "min_examples", "mark_fraction", "max_tokens"})
        return ExplainerId(self.client.name, self.prompt.name, self.prompt.hash, config_hash(conf), conf, self.name)

    def request(self, fx: FeatureExamples) -> ChatRequest:
        body = format_examples(fx, self.cfg.mark_fraction)
        return ChatRequest(messages=self.prompt.render(examples=body), max_tokens=self.cfg.max_tokens)

    def clients(self) -> list[LLMClient]:
        return [self.client]

    def requests(self, features: Sequence[FeatureExamples]) -> list[ChatRequest]:
        return [self.request(fx) for fx in features]

    def explain(self, features: Sequence[FeatureExamples]) -> list[Outcome]:
        out: list[Outcome | None] = [_too_few(fx, self.cfg) for fx in features]
        todo = [i for i, o in enumerate(out) if o is None]
        results = self.client.chat_many([self.request(features[i]) for i in todo])
        for i, res in zip(todo, results, strict=True):
            n = len(features[i].examples)
            if isinstance(res, Failure):
                out[i] = Outcome("failed", error=f"LLM call failed: {res.error}", n_records=n, attempts=res.attempts)
                continue
            try:
                text = parse_explanation(res.text, res.finish_reason)
            except ExplanationParseError as exc:
                out[i] = Outcome("failed", error=str(exc), raw=res.text, n_records=n, prompt_tokens=res.prompt_tokens)
                continue
            out[i] = Outcome("ok", text=text, raw=res.text, n_records=n, prompt_tokens=res.prompt_tokens)
        return [o for o in out if o is not None]


def _norm(token: str) -> str:
    return token.strip().lower()


class TokenExplainer(Explainer):
    """LLM-free baseline: the tokens (and a preceding token, when one dominates) carrying the activation mass.

    A token is scored by its share of the feature's activation mass times the log of how much more often it
    carries mass than it occurs in the corpus (its term in KL(mass || corpus frequency)); frequent tokens that
    activate only as often as they occur score ~0.
    """

    name = "tokens"
    needs_llm = False
    max_tokens_named = 3

    def __init__(self, cfg: ExplainConfig, corpus_freq: Callable[[str], dict[str, float]]) -> None:
        self.cfg = cfg
        self.corpus_freq = corpus_freq  # corpus id -> normalized token -> relative frequency

    @classmethod
    def build(cls, cfg: ExplainConfig, store: Store, client: LLMClient | None) -> Explainer:  # noqa: ARG003
        from autointerp.explain.run import corpus_frequencies

        return cls(cfg, corpus_frequencies(store))

    @property
    def identity(self) -> ExplainerId:
        conf = self.cfg.model_dump(include={"n_top", "n_quantile", "min_examples"})
        conf["max_tokens_named"] = self.max_tokens_named
        return ExplainerId("", "", "", config_hash(conf), conf, self.name)

    def explain(self, features: Sequence[FeatureExamples]) -> list[Outcome]:
        return [self._one(fx) for fx in features]

    def _one(self, fx: FeatureExamples) -> Outcome:
        skip = _too_few(fx, self.cfg)
        if skip is not None:
            return skip
        mass: dict[str, float] = defaultdict(float)
        before: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        shown: dict[str, Counter[str]] = defaultdict(Counter)
        for ex in fx.examples:
            for j, (tok, a) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
                key = _norm(tok)
                if a <= 0 or not key:
                    continue
                mass[key] += a
                shown[key][tok.strip()] += 1
                if j > 0 and _norm(ex.tokens[j - 1]):
                    before[key][ex.tokens[j - 1].strip()] += a
        total = sum(mass.values())
        if total <= 0:
            return Outcome("failed", error="no positive activation on any printable token", n_records=len(fx.examples))
        freq = self.corpus_freq(fx.key)
        floor = 1.0 / (1 + 10 * sum(1 for _ in freq)) if freq else 1e-6
        scored = []
        for key, m in mass.items():
            share = m / total
            scored.append((share * math.log(share / max(freq.get(key, 0.0), floor)), share, key))
        scored.sort(reverse=True)
        picked = [(share, key) for s, share, key in scored[: self.max_tokens_named] if s > 0 and share >= 0.05]
        if not picked:
            picked = [(scored[0][1], scored[0][2])]
        names = [shown[k].most_common(1)[0][0] for _, k in picked]
        quoted = [f'"{n}"' for n in names]
        listing = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        text = f"the token{'s' if len(quoted) > 1 else ''} {listing}"
        lead = before.get(picked[0][1])
        if lead:
            prev, pm = max(lead.items(), key=lambda kv: kv[1])
            if pm >= 0.6 * mass[picked[0][1]]:
                text += f' (after "{prev}")'
        return Outcome("ok", text=text, n_records=len(fx.examples))


EXPLAINERS: dict[str, type[Explainer]] = {LLMExplainer.name: LLMExplainer, TokenExplainer.name: TokenExplainer}


def token_frequencies(token_ids: np.ndarray, decode_one: Callable[[int], str]) -> dict[str, float]:
    """Relative frequency of each normalized token string over a corpus's recorded positions."""
    counts = np.bincount(token_ids.ravel())
    total = counts.sum()
    freq: dict[str, float] = defaultdict(float)
    for tid in np.nonzero(counts)[0]:
        freq[_norm(decode_one(int(tid)))] += float(counts[tid] / total)
    return dict(freq)
