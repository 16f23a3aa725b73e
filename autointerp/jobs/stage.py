"""What the work loop needs of a stage: the `Stage` interface, the records a chunk returns, and the registry of
stages (the only place a stage's name is looked up).

A stage is per-feature work for one identity (an explainer, a set of scorers, a judge with their prompt and config
hashes). Its units are (stage, identity, feature) in the store; the store's result rows say which are finished.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from autointerp.jobs.budget import Spend

if TYPE_CHECKING:
    from autointerp.config import RunConfig
    from autointerp.llm.client import LLMClient
    from autointerp.store.engine import Store
    from autointerp.store.tables import Feature

# Stage name -> "module:Class", in pipeline order. Resolved lazily: the loop sits below the stages, and a reader of
# the names (status, the CLI's checks) needs no stage module. Collection runs before these (run/job.py).
STAGES: dict[str, str] = {
    "explain": "autointerp.explain.run:ExplainStage",
    "score": "autointerp.score.run:ScoreStage",
    "intervene": "autointerp.intervene.run:InterveneStage",
}
COLLECT = "collect"
COLLECT_SHARD = "collect-shard"  # the units of a sharded collection: feature id = the shard's number

# Tasks an executor runs from plain data (a dict in, a dict out) besides stage chunks: name -> "module:function".
TASKS: dict[str, str] = {
    COLLECT_SHARD: "autointerp.collect.shards:run_shard",
}
PIPELINE: tuple[str, ...] = (COLLECT, *STAGES)  # every stage a job may run, in order

# Stands in for an explanation not written yet when the dry run renders a stage's requests (sample_requests).
TYPICAL_EXPLANATION = 'the word "tax" and words about taxes, duties and revenue'


def stage_class(name: str) -> type[Stage]:
    """The Stage class registered under `name` (KeyError for a name not in STAGES)."""
    module, cls = STAGES[name].split(":")
    found: type[Stage] = getattr(importlib.import_module(module), cls)
    return found


def run_task(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run the task registered under `name` (TASKS) on its plain-data payload, in this process."""
    module, fn = TASKS[name].split(":")
    out: dict[str, Any] = getattr(importlib.import_module(module), fn)(payload)
    return out


@dataclass(frozen=True)
class Identity:
    """What produced a result row: stored on it, and (without `config`) part of its unique key."""

    model: str
    prompt: str
    prompt_hash: str
    config_hash: str
    config: dict[str, Any]

    def row_fields(self) -> dict[str, Any]:
        """The identity as the columns of a result row (explanation, score)."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "prompt_hash": self.prompt_hash,
            "config_hash": self.config_hash,
            "config": self.config,
        }


@dataclass
class Tally:
    """Rows written by status, per kind of row (`explanation`, `score:simulation`, `intervention`, ...), and other
    counts a stage reports in its summary (`counters`: forward passes, tokens generated, ...)."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, status: str, n: int = 1) -> None:
        self.by_kind.setdefault(kind, Counter())[status] += n

    def of(self, kind: str) -> dict[str, int]:
        return dict(self.by_kind.get(kind, Counter()))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(c) for k, c in sorted(self.by_kind.items())}

    def merge(self, rows: dict[str, dict[str, int]], counters: dict[str, int]) -> None:
        for kind, by_status in rows.items():
            for status, n in by_status.items():
                self.add(kind, status, n)
        self.counters.update(counters)


@dataclass(frozen=True)
class ChunkResult:
    """What running a chunk gave, as plain data (it may come back from another process or machine): each unit's
    outcome by feature id (ok, failed, skipped), the rows written by kind and status, the stage's counters, and the
    LLM spend and cache hits of its declared clients."""

    outcomes: dict[int, str]
    rows: dict[str, dict[str, int]]
    counters: dict[str, int]
    spend: Spend
    cache_hits: int = 0


class Stage(ABC):
    """One part of a job: a per-feature stage for one identity. The extension point for a new kind of work.

    To add a stage: subclass it, implement the abstract methods, and register `name -> "module:Class"` in STAGES.
    The loop (jobs.loop.Job) then plans its units, claims them under leases, hands chunks to an executor, applies
    budgets and reports progress; the stage itself only reads and writes its rows.

    - `build` makes the parts the config asks for, with their LLM clients (wired to the store's cache and usage log).
      An executor in another process calls it too, from the config and database URL alone, and finds the part by
      its `identity`: build must not depend on anything else.
    - `pending` says which features' rows are not final (one read for all of them); `prepare` re-reads, before each
      chunk, what may have changed since planning (explanations or scores written by an earlier part).
    - `run_chunk` does a chunk and writes its rows (ok, failed or skipped: a failure is a row, never a result),
      with `run_id` on each, counting them in the tally; it returns each feature's outcome.
    - `clients` declares the LLM clients it calls: the loop measures spend through them (budgets), and the dry run
      asks `sample_requests` to build the requests a chunk would send, through a client that sends nothing.
    """

    name: ClassVar[str]  # the registry name (STAGES) and the units' stage
    label: str  # the part's name in progress, summaries and status (explain:llm, score, intervene)
    identity: str  # a hash of what keys the stage's result rows; units are (name, identity, feature)
    chunk_size: int = 1
    llm: str | None = None  # the [llm.NAME] block its clients come from (None: it calls no LLM)

    @classmethod
    @abstractmethod
    def build(cls, cfg: RunConfig, store: Store) -> list[Stage]:
        """The parts of this stage that `cfg` asks for (explain: one per explainer in run.explainers)."""

    @classmethod
    def select(cls, cfg: RunConfig, store: Store) -> list[Feature]:
        """The features this stage's own command works on (its --features and --limit)."""
        from autointerp.store.queries import select_features

        return select_features(store, cfg.explain.features, limit=cfg.explain.limit, seed=cfg.explain.seed)

    def clients(self) -> list[LLMClient]:
        """The LLM clients this part calls (declared, so that every call counts against the job's budget)."""
        return []

    @abstractmethod
    def run_config(self) -> dict[str, Any]:
        """The identity of this execution, recorded on its Run row."""

    @abstractmethod
    def pending(self, features: Sequence[Feature]) -> set[int]:
        """Ids of the features whose rows for this identity are not final."""

    def prepare(self, features: Sequence[Feature]) -> None:  # noqa: B027 (optional hook)
        """Read what a chunk of these features needs that may have changed since planning."""

    @abstractmethod
    def run_chunk(self, features: Sequence[Feature], run_id: int, tally: Tally) -> dict[int, str]:
        """Do the chunk and write its rows, with `run_id` on each, counting them in `tally`. Returns each feature's
        outcome by id (ok, failed, skipped), which the loop keeps on its unit."""

    def after(self, features: Sequence[Feature], run_id: int, tally: Tally) -> None:  # noqa: B027 (optional hook)
        """Rows derived from every selected feature once the units are done (intervene: the verdicts)."""

    def sample_requests(self, features: Sequence[Feature], client: Any) -> None:  # noqa: B027 (optional hook)
        """Send, through `client` (a recording client of the dry run: it answers every request with a failure),
        the requests a chunk of these features would send; nothing may be written."""

    def execute(self, features: Sequence[Feature], run_id: int) -> ChunkResult:
        """Run a chunk and measure it: the outcomes, the rows, and what its clients spent."""
        clients = {id(c): c for c in self.clients()}.values()

        def spent() -> tuple[Spend, int]:
            s = sum((Spend(c.calls, c.prompt_tokens + c.completion_tokens, c.cost_usd) for c in clients), Spend())
            return s, sum(c.cache_hits for c in clients)

        before, hits = spent()
        tally = Tally()
        outcomes = self.run_chunk(features, run_id, tally)
        after, hits_after = spent()
        return ChunkResult(outcomes, tally.as_dict(), dict(tally.counters), after - before, hits_after - hits)


def stage_names(names: Sequence[str]) -> list[str]:
    """Known stage names among `names`, in pipeline order."""
    return [s for s in PIPELINE if s in names]
