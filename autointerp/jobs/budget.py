"""Caps of a job (dollars, LLM tokens, LLM calls, a deadline) and the exit codes that say which one stopped it.

Caps are checked before each unit is claimed, never inside one: once the spend so far plus what the costliest
chunk so far cost would cross a cap, no new unit is claimed, the units in flight finish, and everything written
stays valid; the same command with a higher cap goes on where it stopped. Spend is the job's: the chunks every
worker of the job finished, in this invocation and earlier ones (jobs.loop.Job.job_spent), so N workers together
stop within one chunk per worker of a cap, and a rerun with the same cap claims nothing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

EXIT_DONE = 0
EXIT_BUDGET = 3
EXIT_DEADLINE = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = {"done": EXIT_DONE, "budget": EXIT_BUDGET, "deadline": EXIT_DEADLINE, "interrupted": EXIT_INTERRUPTED}


class BudgetError(ValueError):
    """A cap or deadline that cannot be used (not a number, negative, a time in the past)."""


@dataclass(frozen=True)
class Spend:
    calls: int = 0
    tokens: int = 0
    usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.calls + other.calls, self.tokens + other.tokens, self.usd + other.usd)

    def __sub__(self, other: Spend) -> Spend:
        return Spend(self.calls - other.calls, self.tokens - other.tokens, self.usd - other.usd)


@dataclass
class Budget:
    max_usd: float | None = None
    max_tokens: int | None = None
    max_calls: int | None = None
    deadline: float | None = None  # time.time() after which no unit is claimed
    largest: Spend = field(default_factory=Spend)  # the costliest chunk so far, per measure

    def __post_init__(self) -> None:
        for name, v in (("--budget-usd", self.max_usd), ("--max-llm-tokens", self.max_tokens),
                        ("--max-calls", self.max_calls)):  # fmt: skip
            if v is not None and not v >= 0:
                raise BudgetError(f"{name} must be a number >= 0, got {v}")

    def record_chunk(self, cost: Spend) -> None:
        self.largest = Spend(max(self.largest.calls, cost.calls), max(self.largest.tokens, cost.tokens),
                             max(self.largest.usd, cost.usd))  # fmt: skip

    def stop_reason(self, spent: Spend, now: float | None = None, in_flight: int = 0) -> str | None:
        """Why no further unit may be claimed ("budget: ..." / "deadline: ..."), or None. `in_flight` chunks are
        running and not yet counted: each is taken to cost as much as the costliest chunk so far."""
        now = time.time() if now is None else now
        if self.deadline is not None and now >= self.deadline:
            return "deadline: " + datetime.fromtimestamp(self.deadline).strftime("%Y-%m-%d %H:%M") + " reached"
        caps = (("--budget-usd", self.max_usd, spent.usd, self.largest.usd, "${:.4f}"),
                ("--max-llm-tokens", self.max_tokens, spent.tokens, self.largest.tokens, "{:,}"),
                ("--max-calls", self.max_calls, spent.calls, self.largest.calls, "{:,}"))  # fmt: skip
        for flag, cap, used, step, fmt in caps:
            # used >= cap: a cap of 0 claims nothing (before any chunk is measured, step is 0)
            if cap is not None and (used + step * (1 + in_flight) > cap or used >= cap):
                return f"budget: {flag} {cap} would be crossed ({fmt.format(used)} spent so far)"
        return None


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str) -> float:
    """'8h', '90m', '1h30m', '45s' -> seconds."""
    m = _DURATION.match(text)
    if not text.strip() or m is None or not any(m.groups()):
        raise BudgetError(f"--for {text!r}: expected a duration like 8h, 90m or 1h30m")
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def parse_until(text: str, now: datetime | None = None) -> float:
    """'07:00' (the next such time today or tomorrow) or an ISO date and time -> a time.time() deadline. A full
    date and time in the past is an error; a bare clock time always means the next one."""
    now = now or datetime.now()
    clock = re.match(r"^\s*(\d{1,2}):(\d{2})\s*$", text)
    if clock:
        hh, mm = int(clock.group(1)), int(clock.group(2))
        if hh > 23 or mm > 59:
            raise BudgetError(f"--until {text!r}: not a time of day")
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if at <= now:
            at += timedelta(days=1)
        return at.timestamp()
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BudgetError(f"--until {text!r}: expected HH:MM or an ISO date and time (2026-12-02T07:00)") from None
    if at <= now:
        raise BudgetError(f"--until {text!r} is in the past (now {now:%Y-%m-%d %H:%M})")
    return at.timestamp()
