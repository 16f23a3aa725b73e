"""The work loop every per-feature stage runs on, the one progress type, and the LLM client wiring.

A stage declares its units (a feature, for explain / score / intervene) for one identity (explainer, scorers or
judge with their prompt and config hashes); the store says which units are finished; the loop runs the rest in
chunks, writes their rows (ok, failed or skipped: a failure is never written as a result), reports progress, and
records one `Run` row per execution whose id is set on every row written. Collection keeps its own streaming pass
but reports through the same `Progress`. The job runner claims units through this same loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from autointerp.config import LLMConfig, RunConfig

if TYPE_CHECKING:
    from autointerp.llm.client import LLMClient
    from autointerp.store.engine import Store

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): called after every chunk (collect: after every batch)."""

U = TypeVar("U")


def _clock(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class LogLines:
    """A Progress for output that is not a terminal (an overnight log file): one plain, flushed line per phase at
    each tenth of the way, at least every `every_s` seconds while it moves, and when it ends; no bars, no escape
    codes. `now` is injectable for tests."""

    def __init__(self, stream: Any, *, every_s: float = 30.0, now: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.every_s, self.now = stream, every_s, now
        self._start: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}  # phase -> (time, tenth) of the last line

    def __call__(self, phase: str, done: int, total: int) -> None:
        t = self.now()
        start = self._start.setdefault(phase, t)
        tenth = 10 * done // total if total > 0 else 10
        last_t, last_tenth = self._last.get(phase, (start, -1))
        if not (tenth > last_tenth or done >= total or t - last_t >= self.every_s):
            return
        self._last[phase] = (t, tenth)
        elapsed = t - start
        line = f"{time.strftime('%H:%M:%S')} {phase}: {done}/{total}"
        if total > 0:
            line += f" ({100 * done / total:.0f}%), {_clock(elapsed)} elapsed"
            if 0 < done < total:
                line += f", about {_clock(elapsed * (total - done) / done)} left"
        self.stream.write(line + "\n")
        self.stream.flush()


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
    """Rows written by status, per kind of row (`explanation`, `score:simulation`, `intervention`, ...)."""

    by_kind: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, kind: str, status: str, n: int = 1) -> None:
        self.by_kind.setdefault(kind, Counter())[status] += n

    def of(self, kind: str) -> dict[str, int]:
        return dict(self.by_kind.get(kind, Counter()))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(c) for k, c in sorted(self.by_kind.items())}


class Stage(ABC, Generic[U]):
    """A per-feature stage: its units, which of them are finished, and how a chunk of the rest is done."""

    name: ClassVar[str]
    chunk_size: int = 1

    @abstractmethod
    def run_config(self) -> dict[str, Any]:
        """The identity of this execution, recorded on its Run row."""

    @abstractmethod
    def units(self) -> Sequence[U]:
        """Every selected unit, finished or not, in the order they are run."""

    @abstractmethod
    def pending(self, units: Sequence[U]) -> list[U]:
        """The units that are not finished (one store query for all of them)."""

    @abstractmethod
    def run_chunk(self, chunk: Sequence[U], run_id: int, tally: Tally) -> dict[int, str]:
        """Do the chunk and write its rows, with `run_id` on each, counting them in `tally`. Returns each unit's
        outcome by feature id (ok, failed, skipped), which the job runner keeps on the unit."""

    def after(self, units: Sequence[U], run_id: int, tally: Tally) -> None:  # noqa: B027 (optional hook)
        """Rows derived from every selected unit once the chunks are done (intervene: the verdicts)."""


@dataclass(frozen=True)
class LoopResult:
    stage: str
    run_id: int
    selected: int
    pending: int
    rows: dict[str, dict[str, int]]
    seconds: float


def run_stage(store: Store, stage: Stage[U], *, progress: Progress | None = None) -> LoopResult:
    """Run the pending units of a stage in chunks; one Run row for this execution, finished with its counts
    (`done`), or marked `failed` / `interrupted` with the error when an exception or Ctrl-C stops it."""
    from autointerp.store.runs import finish_run, start_run, update_run

    t0 = time.perf_counter()
    units = stage.units()
    todo = stage.pending(units)
    run_id = start_run(store, stage.name, stage.run_config(), total=len(todo))
    tally = Tally()
    done = 0
    try:
        step = max(1, stage.chunk_size)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            stage.run_chunk(chunk, run_id, tally)
            done += len(chunk)
            update_run(store, run_id, done, tally.as_dict())
            if progress is not None:
                progress(stage.name, done, len(todo))
        stage.after(units, run_id, tally)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        finish_run(store, run_id, status, tally.as_dict(), error=f"{type(exc).__name__}: {exc}")
        raise
    finish_run(store, run_id, "done", tally.as_dict())
    return LoopResult(stage.name, run_id, len(units), len(todo), tally.as_dict(), time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------
# LLM client wiring


def make_client(cfg: RunConfig, store: Store | None, name: str, *, stage: str = "", cache: bool = True) -> LLMClient:
    """The client of the [llm.NAME] block, wired to the store's response cache and usage log."""
    from autointerp.llm.client import client_for
    from autointerp.store.llm_log import SqlResponseCache, SqlUsageLog

    c: LLMConfig = cfg.llm_config(name)
    return client_for(
        c,
        cache=SqlResponseCache(store) if store is not None and cache else None,
        usage=SqlUsageLog(store, stage) if store is not None else None,
    )
