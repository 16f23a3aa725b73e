"""The one progress type of every stage, and its form for output that is not a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total): called after every chunk (collect: after every batch)."""


def clock(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class LogLines:
    """A Progress for output that is not a terminal (an overnight log file): one plain, flushed line per phase at
    each tenth of the way, at least every `every_s` seconds while it moves, and when it ends; no bars, no escape
    codes. A phase's time runs from its first report: the work loop reports each part at 0 when it starts (its
    first chunk may take long), so elapsed times and the time left are the phase's own. `now` is injectable for
    tests."""

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
            line += f" ({100 * done / total:.0f}%), {clock(elapsed)} elapsed"
            if 0 < done < total:
                line += f", about {clock(elapsed * (total - done) / done)} left"
        self.stream.write(line + "\n")
        self.stream.flush()
