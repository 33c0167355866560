"""Progress bars for long work (rich), with a no-op twin for quiet runs and tests."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class TrainingClock:
    """Steps, time budget and a whole-run ETA for a training loop that can stop early.

    ``tick()`` after every optimizer step. After ``eta_after_steps`` steps (and at least ``eta_after_s`` seconds, so
    the warm-up does not distort it) one line says how long an epoch and the whole run will take, and where the
    budget will stop it. ``exhausted`` turns true at the first step that reaches ``max_steps`` (counted over this
    process's run, resumes start from 0) or ``max_minutes``; the loop then finishes that step, saves, and ends."""

    def __init__(
        self,
        label: str,
        steps_per_epoch: int,
        epochs_left: int,
        *,
        max_steps: int | None = None,
        max_minutes: float | None = None,
        report: bool = True,
        eta_after_steps: int = 5,
        eta_after_s: float = 5.0,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        if max_minutes is not None and not max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {max_minutes}")
        self.label, self.steps_per_epoch, self.epochs_left = label, max(1, steps_per_epoch), epochs_left
        self.max_steps, self.max_minutes, self.report = max_steps, max_minutes, report
        self.eta_after_steps, self.eta_after_s = eta_after_steps, eta_after_s
        self.steps = 0
        self.start = time.perf_counter()
        self.eta_line: str | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def stop_reason(self) -> str | None:
        if self.max_steps is not None and self.steps >= self.max_steps:
            return f"--max-steps {self.max_steps}"
        if self.max_minutes is not None and self.elapsed >= 60.0 * self.max_minutes:
            return f"--max-minutes {self.max_minutes:g}"
        return None

    @property
    def exhausted(self) -> bool:
        return self.stop_reason is not None

    def stopped_line(self, reason: str, epoch: int, done: int, unit: str) -> str:
        """What a loop prints when ``reason`` ended it in (1-based) ``epoch`` after ``done`` of its ``unit``."""
        return (f"stopped by {reason} after {self.steps} steps ({self.elapsed / 60:.1f} min), in epoch {epoch} at "
                f"{done} of its {unit}; --resume with more --epochs continues")

    def tick(self) -> None:
        self.steps += 1
        if self.eta_line is None and self.steps >= self.eta_after_steps and self.elapsed >= self.eta_after_s:
            per_step = self.elapsed / self.steps
            total = self.steps_per_epoch * self.epochs_left
            line = (f"{self.label}: {per_step:.2f} s per step after {self.steps} steps; an epoch of "
                    f"{self.steps_per_epoch} steps takes about {_duration(per_step * self.steps_per_epoch)}, the "
                    f"{self.epochs_left} epoch(s) left about {_duration(per_step * total)}")
            budget = [total]
            if self.max_steps is not None:
                budget.append(self.max_steps)
            if self.max_minutes is not None:
                budget.append(round(60.0 * self.max_minutes / per_step))
            if min(budget) < total:
                line += f"; the budget stops it after about {min(budget)} steps ({_duration(per_step * min(budget))})"
            self.eta_line = line
            if self.report:
                stderr.print(line, highlight=False, markup=False, soft_wrap=True)
