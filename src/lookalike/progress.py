"""Progress of long work: a Rich bar on a terminal, a plain line every few percent when output is captured.

Under a sweep, a run's output goes to a pipe and a log file, where a live bar would be one endless line.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console


class _PlainProgress:
    def __init__(self, console: Console, description: str, total: int, completed: int):
        self.console, self.description, self.total, self.completed = console, description, total, completed
        self.every = max(1, total // 20)
        self.started = time.perf_counter()
        self.start_count = completed

    def update(self, advance: int = 1, **fields: str) -> None:
        self.completed += advance
        if self.completed % self.every and self.completed != self.total:
            return
        done = self.completed - self.start_count
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - self.completed) if done else 0.0
        extra = " ".join(f"{k} {v}" for k, v in fields.items())
        self.console.print(f"{self.description} {self.completed}/{self.total} {extra} eta {eta:.0f}s", highlight=False)


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def update(self, advance: int = 1, **fields: str) -> None:
        self.progress.update(self.task, advance=advance, info=" ".join(f"{k} {v}" for k, v in fields.items()))


@contextmanager
def progress_bar(console: Console, description: str, total: int, completed: int = 0) -> Iterator:
    if not console.is_terminal:
        yield _PlainProgress(console, description, total, completed)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}", markup=False), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _RichProgress(progress, progress.add_task(description, total=total, completed=completed, info=""))
