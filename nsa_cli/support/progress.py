"""Progress of long work on stderr (never stdout): a Rich bar on a terminal, nothing when stderr
is not one or when the command prints JSON."""

from __future__ import annotations

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


@contextmanager
def progress(what: str, total: float | None, enabled: bool = True) -> Iterator[Reporter]:
    """A transient progress bar on stderr while the block runs (when enabled and stderr is a terminal)."""
    console = common.err_console
    if not enabled or not console.is_terminal:
        yield Reporter(None, None)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield Reporter(bar, bar.add_task(what, total=total))
