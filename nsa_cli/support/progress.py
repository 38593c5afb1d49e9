"""Progress of long work on stderr (never stdout): a Rich bar on a terminal; when stderr is not one,
nothing, or for commands that ask for it (`lines`) one line each time the work moves to a new step;
nothing when the command prints JSON."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

from nsa_cli.support import common


class Reporter:
    """What a command calls while it works: update(completed, what) and advance(n, what)."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def update(self, completed: float | None = None, what: str | None = None, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, description=what, total=total)

    def advance(self, amount: float = 1, what: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=amount, description=what)


class LineReporter(Reporter):
    """A Reporter writing one line per new step ("what"), after the seconds since the start."""

    def __init__(self, console) -> None:
        super().__init__(None, None)
        self._console, self._last, self._start = console, None, time.perf_counter()

    def update(self, completed: float | None = None, what: str | None = None, total: float | None = None) -> None:
        if what is not None and what != self._last:
            self._last = what
            self._console.print(f"[{time.perf_counter() - self._start:6.1f} s] {what}", markup=False, highlight=False,
                                soft_wrap=True)

    def advance(self, amount: float = 1, what: str | None = None) -> None:
        self.update(what=what)


@contextmanager
def progress(what: str, total: float | None, enabled: bool = True, lines: bool = False) -> Iterator[Reporter]:
    """A transient progress bar on stderr while the block runs (when enabled and stderr is a
    terminal); with `lines`, when stderr is not a terminal, a line per step instead."""
    console = common.err_console
    if not enabled:
        yield Reporter(None, None)
        return
    if not console.is_terminal:
        yield LineReporter(console) if lines else Reporter(None, None)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield Reporter(bar, bar.add_task(what, total=total))
