"""Progress of a running stage in the terminal: rich bars, or plain log lines when the output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from autointerp.jobs import LogLines, Progress


@contextmanager
def progress(console: Console) -> Iterator[Progress]:
    """A jobs.Progress for the CLI: bars on a terminal; plain log lines (jobs.LogLines) when the console writes to a
    file or a pipe, e.g. an overnight log."""
    if not console.is_terminal:
        yield LogLines(console.file)
        return
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with RichProgress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update
