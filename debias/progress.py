"""Progress bars for long work (rich), with a no-op twin for quiet runs and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: float) -> None:
        if self._progress is not None:
            info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, info=info)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=stderr,
        transient=not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task(description, total=total, info="")
        yield _Bar(progress, task)


def epoch_line(row: dict, keys: tuple[str, ...] | None = None) -> str:
    """One printed line per finished epoch: ``key value`` pairs, floats to 4 significant digits."""
    items = [(k, row[k]) for k in keys if k in row] if keys is not None else list(row.items())
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)
