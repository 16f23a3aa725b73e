"""Simulator: an explanation and test records' tokens -> a predicted activation in [0, 10] for every token.

Two methods, in SIMULATORS; `make_simulator` picks the first when the backend serves prompt log-probabilities:

- `logprobs`, "all at once" (OpenAI 2023): ONE forward pass per record, no generation. The prompt
  (prompts/simulate.toml) holds few-shot blocks of "token<TAB>digit" lines, then the explanation and one line per
  record token whose digit is replaced by the placeholder `unknown`. At each slot (where a digit would start) the
  model's next-token distribution over the digit candidates gives the prediction as an expected value.
- `json`, the fallback: the model writes a JSON list of numbers (prompts/simulate_json.toml), validated with
  pydantic; an invalid answer is re-asked once with the validation error; a length mismatch or an out-of-range
  value after that is a SimFailure carrying the raw answer, never a padded or clipped prediction.

Value scale (logprobs). Prompt values are ONE digit 0-9: "0".."9" are single tokens in every tokenizer we know,
while "10" is two tokens in SmolLM2 and Llama ("1", "0") and would share its first token with "1", which one
forward pass cannot tell apart. The shots are written with the project's rounding semantics (autointerp.records)
on a 0-9 grid, digit = ceil(9 * a / max) for a > 0: any positive activation shows as at least 1, the maximum as 9.
The prediction is 10/9 * E[digit], with probabilities renormalized over the digits (mass on other tokens is
dropped), hence in [0, 10] like the JSON method's answers and the explainer's integers.

Layout. Plain text, no chat template: the same text goes to every backend that serves prompt log-probabilities
(local transformers, vLLM, llama.cpp's server, completions endpoints), so a result means the same whatever
serves it. Tokens are shown as decoded strings with newlines, tabs and other control characters spelled out
(`\\n`, `\\t`, `\\x0b`): a line is a line and the only real tab is the separator before the slot.

Alignment. The subject model's tokens and the simulator's tokenizer differ in general (digits split one by one,
whitespace runs merged, multi-byte characters split into byte tokens), so nothing assumes that token counts
match: the simulator knows the character offset of every slot in the text it built, and reads the distribution
of the simulator token that starts exactly at that offset (LogprobsResult.offsets), i.e. the row of the token
before it. A slot where no simulator token starts is a SimFailure naming the token, never a guess; with
byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2) the tab is always its own pre-token and a letter run starts a
new one, so the boundary before `unknown` always exists. Servers return only their top-k alternatives (top 20
asked): a slot with no digit among them is a SimFailure too, not a 0. An empty record's prediction is [].

Shared prefix. The instructions, the shots and the explanation are the same for every record of a feature: they
travel as LogprobsRequest.prefix (ending with a newline), which the local backend encodes once per feature and
whose key/value cache it reuses for every record (and the instructions and shots, the same for every feature, it
encodes once); servers do their own prefix caching.

Slots only. A request names the slots' offsets (LogprobsRequest.read_at): backends return the digits' rows there
and nothing else, so a cached response holds 10 numbers per record token, and the local backend runs its LM head
at the slots only.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from autointerp.llm.client import LLMClient
from autointerp.llm.types import ChatRequest, ChatResult, Failure, LogprobsRequest, LogprobsResult, Message
from autointerp.prompts import Prompt, PromptError, load_prompt
from autointerp.records import visible

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
# Prediction = SCALE * E[digit]: digit 9 (the prompt's maximum) is activation 10.
SCALE = 10.0 / 9.0


@dataclass(frozen=True)
class SimFailure:
    """A record the simulator could not predict: the reason, and the model's raw answer when there was one."""

    error: str
    raw: str | None = None


@dataclass(frozen=True)
class SimulatorId:
    """What produced a simulation: stored with every score computed from it."""

    method: str
    model: str
    prompt: str
    prompt_hash: str


Prediction = list[float] | SimFailure


class Simulator(ABC):
    method: ClassVar[str]

    def __init__(self, client: LLMClient, prompt: Prompt) -> None:
        self.client = client
        self.prompt = prompt

    @property
    def identity(self) -> SimulatorId:
        return SimulatorId(self.method, self.client.name, self.prompt.name, self.prompt.hash)

    @abstractmethod
    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Prediction]:
        """Per record (its decoded token strings), one prediction in [0, 10] per token, or a SimFailure."""


def display_token(token: str) -> str:
    """A token as one line of a prompt: newlines and tabs as \\n and \\t, other control characters as \\xNN."""
    return _CONTROL.sub(_escape, visible(token))


# C0 controls (tab, newline and carriage return are already spelled out by `visible`), DEL, and the characters
# that tokenizers or readers treat as line breaks (NEL, line and paragraph separators).
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def _clean_explanation(explanation: str) -> str:
    text = " ".join(explanation.split())  # one line: a newline would break the block layout
    if not text:
        raise ValueError("cannot simulate an empty explanation")
    return text


# -- all at once, from prompt log-probabilities ------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
    text: str
    slots: tuple[int, ...]  # character offset of each token's slot in `text`


class LogprobSimulator(Simulator):
    """One forward pass per record; the prediction at a token is the expected digit at its slot, rescaled."""

    method = "logprobs"

    def __init__(
        self,
        client: LLMClient,
        prompt: Prompt | None = None,
        *,
        reuse_prefix: bool = True,
        top_logprobs: int = 20,
    ) -> None:
        super().__init__(client, prompt or load_prompt("simulate"))
        self.reuse_prefix = reuse_prefix
        # Servers return only the top-k alternatives (the local backend returns every candidate besides): 20 is
        # vLLM's default ceiling, and leaves room for the digits next to the tokens a small model also expects.
        self.top_logprobs = top_logprobs
        self.end = self.prompt.field("end")
        self.unknown = self.prompt.field("unknown")

    def _block(self, explanation: str) -> str:
        return self.prompt.fill(self.prompt.user, explanation=explanation)

    def prefix(self, explanation: str) -> str:
        """Everything before the record's first token line: instructions, shots, the explanation's header."""
        parts = [self.prompt.system.rstrip("\n"), "\n\n"]
        for shot_explanation, lines in self.prompt.shots:
            parts += [self._block(shot_explanation), lines.rstrip("\n"), "\n", self.end, "\n\n"]
        parts.append(self._block(_clean_explanation(explanation)))
        text = "".join(parts)
        if not text.endswith("\n"):
            raise PromptError(f"prompt {self.prompt.name!r}: the block header must end with a newline")
        return text

    def body(self, tokens: Sequence[str]) -> _Body:
        """One line per token: the displayed token, a tab, then the slot holding the placeholder."""
        parts: list[str] = []
        slots: list[int] = []
        pos = 0
        for t in tokens:
            head = display_token(t) + "\t"
            slots.append(pos + len(head))
            line = head + self.unknown + "\n"
            parts.append(line)
            pos += len(line)
        return _Body("".join(parts), tuple(slots))

    def request(self, prefix: str, body: _Body) -> LogprobsRequest:
        # the slots are all the simulator reads: the backend fills (and the response cache keeps) those rows only
        read_at = tuple(len(prefix) + s for s in body.slots)
        if self.reuse_prefix:
            return LogprobsRequest(body.text, DIGITS, self.top_logprobs, prefix=prefix, read_at=read_at)
        return LogprobsRequest(prefix + body.text, DIGITS, self.top_logprobs, read_at=read_at)

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Prediction]:
        prefix = self.prefix(explanation)
        bodies = [self.body(r) for r in records]
        todo = [i for i, r in enumerate(records) if len(r) > 0]
        out: list[Prediction] = [[] for _ in records]  # an empty record has nothing to predict
        results = self.client.logprobs_many([self.request(prefix, bodies[i]) for i in todo])
        for i, res in zip(todo, results, strict=True):
            if isinstance(res, Failure):
                out[i] = SimFailure(f"LLM call failed: {res.error}")
            else:
                out[i] = read_slots(res, [len(prefix) + s for s in bodies[i].slots], records[i])
        return out


def read_slots(res: LogprobsResult, slots: Sequence[int], tokens: Sequence[str]) -> Prediction:
    """The expected activation at each slot (a character offset in prefix + body), or why it cannot be read."""
    offsets = list(res.offsets)
    preds: list[float] = []
    for k, slot in enumerate(slots):
        j = bisect.bisect_left(offsets, slot)
        if j >= len(offsets) or offsets[j] != slot or j == 0:
            return SimFailure(
                f"token {k} ({display_token(tokens[k])!r}): no simulator token starts at its activation slot "
                f"(offset {slot}), so the digit distribution there cannot be read"
            )
        dist = res.logprobs[j - 1]  # the distribution of the token that starts at the slot
        probs = [(d, math.exp(dist[c])) for d, c in enumerate(DIGITS) if c in dist]
        total = sum(p for _, p in probs)
        if not probs or total <= 0:
            return SimFailure(
                f"token {k} ({display_token(tokens[k])!r}): no digit among the returned log-probabilities at its "
                "slot (raise top_logprobs, or use a backend that returns every candidate)"
            )
        preds.append(SCALE * sum(d * p for d, p in probs) / total)
    return preds


# -- JSON fallback ---------------------------------------------------------------------------------------------

_LIST = re.compile(r"\[[^\[\]]*\]", re.DOTALL)
# Answers are short numbers ("0, " is ~3 tokens in BPE vocabularies); the rest is room for brackets and slack.
_TOKENS_PER_VALUE = 4


class _Predictions(BaseModel):
    n: int
    values: list[Annotated[float, Field(strict=True, ge=0, le=10)]]

    @model_validator(mode="after")
    def _one_per_token(self) -> _Predictions:
        if len(self.values) != self.n:
            raise ValueError(f"the list has {len(self.values)} numbers for {self.n} tokens")
        return self


class AnswerError(ValueError):
    """A JSON answer that does not validate: the message is what the model is told when re-asked."""


def parse_answer(raw: str, n: int) -> list[float]:
    """The JSON list of `n` numbers in [0, 10] inside an answer (code fences and prose around it are allowed)."""
    found = _LIST.search(raw)
    if found is None:
        raise AnswerError("the answer contains no JSON list")
    try:
        values = json.loads(found.group())
    except json.JSONDecodeError as exc:
        raise AnswerError(f"the list is not valid JSON ({exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # a number past CPython's int-conversion limit, or nesting too deep
        raise AnswerError(f"the list is not valid JSON ({type(exc).__name__}: {str(exc)[:60]})") from exc
    try:
        return _Predictions(n=n, values=values).values
    except ValidationError as exc:
        msgs = []
        for e in exc.errors()[:3]:
            where = ".".join(str(x) for x in e["loc"])
            msgs.append(f"{where}: {e['msg'].removeprefix('Value error, ')} (got {e['input']!r})"[:160])
        raise AnswerError("; ".join(msgs)) from exc


class JsonSimulator(Simulator):
    """Predictions written by the model as JSON; validated, re-asked once, otherwise a SimFailure."""

    method = "json"

    def __init__(self, client: LLMClient, prompt: Prompt | None = None) -> None:
        super().__init__(client, prompt or load_prompt("simulate_json"))
        self.reask = self.prompt.field("reask")

    def request(self, explanation: str, tokens: Sequence[str]) -> ChatRequest:
        shown = json.dumps(list(tokens), ensure_ascii=False)  # JSON escapes newlines, tabs and quotes
        msgs = self.prompt.render(explanation=_clean_explanation(explanation), n=str(len(tokens)), tokens=shown)
        return ChatRequest(messages=msgs, max_tokens=_TOKENS_PER_VALUE * len(tokens) + 16)

    def followup(self, req: ChatRequest, answer: str, error: str, n: int) -> ChatRequest:
        again = self.prompt.fill(self.reask, error=error, n=str(n))
        # A lone surrogate (JSON can escape one) cannot be encoded into the request's cache key: sent as "?".
        shown = answer.encode("utf-8", "replace").decode("utf-8")
        msgs = (*req.messages, Message("assistant", shown), Message("user", again))
        return ChatRequest(messages=msgs, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed)

    def simulate(self, explanation: str, records: Sequence[Sequence[str]]) -> list[Prediction]:
        out: list[Prediction] = [[] for _ in records]
        todo = [i for i, r in enumerate(records) if len(r) > 0]
        reqs = {i: self.request(explanation, records[i]) for i in todo}
        retry: dict[int, ChatRequest] = {}
        for i, res in zip(todo, self.client.chat_many([reqs[i] for i in todo]), strict=True):
            got = _judge(res, len(records[i]))
            if isinstance(got, _Invalid):
                retry[i] = self.followup(reqs[i], got.raw, got.error, len(records[i]))
            else:
                out[i] = got
        for i, res in zip(retry, self.client.chat_many(list(retry.values())), strict=True):
            got = _judge(res, len(records[i]))
            out[i] = (
                SimFailure(f"invalid answer after one re-ask: {got.error}", got.raw)
                if isinstance(got, _Invalid)
                else got
            )
        return out


@dataclass(frozen=True)
class _Invalid:
    error: str
    raw: str


def _judge(res: ChatResult | Failure, n: int) -> list[float] | SimFailure | _Invalid:
    if isinstance(res, Failure):
        return SimFailure(f"LLM call failed: {res.error}")
    try:
        return parse_answer(res.text, n)
    except AnswerError as exc:
        return _Invalid(str(exc), res.text)


# -- choice ----------------------------------------------------------------------------------------------------

SIMULATORS: dict[str, type[LogprobSimulator] | type[JsonSimulator]] = {
    LogprobSimulator.method: LogprobSimulator,
    JsonSimulator.method: JsonSimulator,
}


def make_simulator(client: LLMClient, *, prefer: Literal["auto", "logprobs", "json"] = "auto") -> Simulator:
    """The logprobs simulator when the backend serves prompt log-probabilities (`auto` asks it), else JSON."""
    method: str = prefer
    if prefer == "auto":
        method = LogprobSimulator.method if client.capabilities().prompt_logprobs else JsonSimulator.method
    try:
        cls = SIMULATORS[method]
    except KeyError:
        raise ValueError(
            f"unknown simulator {prefer!r}: choose auto or one of {', '.join(sorted(SIMULATORS))}"
        ) from None
    return cls(client)
