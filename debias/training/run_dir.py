"""A training run's folder, kept the same way by every training loop (VAE, classifier, GAN, CycleGAN), and the two
pieces of bookkeeping every step shares (:func:`optimizer_step`, :class:`EpochMeter`).

RUN_DIR, whatever the loop:
    checkpoint.pt   the loop's own state (networks, optimizers, ...) + the run's record + epoch + history + version,
                    rewritten atomically by rank 0 after every epoch; ``resume=True`` continues from it
    config.json     the run's options, human readable (where the loop gives them)
    <history>       one row per epoch (loss.csv, history.csv), rewritten atomically after every epoch
    <artifact>      the finished model: its state + the record + history + version (model.pt, generator.pt, ...)

The *record* is what says what a run learns from and how: ``model_config``, ``train_config`` (see
:func:`run_record`), and the loop's own entries (``data``, ``meta``, ``weights``). It is stored in the checkpoint and
the artifact, and one rule decides every resume: the checkpoint's record must have the new run's :func:`identity`.

A loop reads top to bottom::

    run = open_run(out, record, resume=resume, ctx=ctx, seed=config.seed, progress=progress)  # refuses or resumes
    ... build the model; load its state from run.resumed when that is set ...
    for epoch in range(run.start_epoch, config.epochs):
        rows = run.shard(epoch, draw(run.seed_epoch(epoch)), "tag")
        meter = EpochMeter()
        ... the step body, inline: loss, optimizer_step(optimizer, loss), meter.add(parts, len(batch)) ...
        means, seen = meter.means(ctx)
        row = {"epoch": epoch + 1, **means}
        run.history.append(row)
        if ctx.is_main:
            save_checkpoint(run.checkpoint_state(epoch + 1, {...}), run.checkpoint)
        run.end_epoch(epoch_line(row))
    return run.finish(ARTIFACT, {...})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from debias import __version__
from debias.errors import DebiasError
from debias.runtime.checkpoint import (
    atomic_write_table,
    load_checkpoint,
    resume_identity,
    save_checkpoint,
    write_json,
)
from debias.runtime.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    record_rows,
    seed_rank_noise,
    shard,
)

CHECKPOINT = "checkpoint.pt"

#: Why a resume is refused, by the record entry that differs; the first that differs, in this order, is named.
_REFUSALS = {
    "data": "it was trained on other data",
    "meta": "the data or options differ from the checkpoint's",
    "model_config": "the model options differ from the checkpoint's",
    "train_config": "the training options (other than --epochs) differ from the checkpoint's",
    "weights": "the sampling weights differ from the checkpoint's",
}


def run_record(model_config: Any, config: Any, **entries: Any) -> dict[str, Any]:
    """A run's record: the model options, the training options a resume must keep (:func:`resume_identity`), and
    the loop's own ``entries`` (``data=asdict(data_desc)``, ``meta=...``, ``weights=digest``)."""
    return {"model_config": model_config.to_dict(), "train_config": resume_identity(config), **entries}


def identity(record: dict[str, Any]) -> dict[str, Any]:
    """What of a record a resume must find unchanged: every entry, with a data description counted by its
    fingerprint alone (the same images found under another path are the same data) and a training config without
    :data:`~debias.runtime.checkpoint.RESUMABLE_CHANGES` (how long and where a run trains, not what it learns).
    Applied to a stored record too, so that checkpoints written before this rule resume under it."""
    out = dict(record)
    if isinstance(out.get("data"), dict):
        out["data"] = out["data"].get("fingerprint")
    if isinstance(out.get("train_config"), dict):
        out["train_config"] = resume_identity(out["train_config"])
    return out


def check_resumable(stored: dict[str, Any], record: dict[str, Any], out: Path) -> None:
    """Refuse, in one line naming what differs, a resume whose checkpoint ``stored`` was another run than
    ``record`` describes."""
    then, now = identity({k: stored.get(k) for k in record}), identity(record)
    for key in [k for k in _REFUSALS if k in now] + [k for k in now if k not in _REFUSALS]:
        if then[key] != now[key]:
            reason = _REFUSALS.get(key, f"the {key} differs from the checkpoint's")
            raise DebiasError(f"cannot resume {out}: {reason} ({_difference(then[key], now[key])})")


def _difference(then: Any, now: Any) -> str:
    """The keys that differ between two option dicts (one may be missing), else the two values."""
    if isinstance(then, dict) or isinstance(now, dict):
        then, now = then if isinstance(then, dict) else {}, now if isinstance(now, dict) else {}
        return ", ".join(sorted(str(k) for k in set(then) | set(now) if then.get(k) != now.get(k)))
    return f"{then}, now {now}"


@dataclass
class RunDir:
    """An open run folder: where a loop starts (``start_epoch``, ``history``, the checkpoint it ``resumed``), and the
    writes every loop makes the same way. Made by :func:`open_run`."""

    out: Path
    record: dict[str, Any]
    ctx: DistContext
    seed: int
    progress: bool  # show progress and epoch lines: asked for, and this is rank 0
    history_name: str = "loss.csv"
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: dict[str, Any] | None = None  # the checkpoint a resume continues from; the loop loads its state

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT

    def seed_epoch(self, epoch: int) -> np.random.Generator:
        """Seed torch's global generator for ``epoch`` and return the epoch's numpy generator. Both come from
        (seed, epoch) alone, so that a resumed run, and every rank, draws what an uninterrupted single process does."""
        torch.manual_seed(self._epoch_seed(epoch))
        return np.random.default_rng([self.seed, epoch])

    def shard(self, epoch: int, order: np.ndarray, tag: str) -> np.ndarray:
        """This rank's slice of the epoch's global ``order`` (saved under ``tag`` with DEBIAS_RECORD_ROWS), and this
        rank's own noise stream from here on: call it once the draws every rank must share are made."""
        seed_rank_noise(self._epoch_seed(epoch), self.ctx)
        rows = shard(order, self.ctx)
        record_rows(tag, epoch, rows, self.ctx)
        return rows

    def _epoch_seed(self, epoch: int) -> int:
        return self.seed * 100_003 + epoch

    def checkpoint_state(self, epoch: int, state: dict[str, Any]) -> dict[str, Any]:
        """What checkpoint.pt holds after ``epoch`` (1-based) epochs: the loop's ``state``, the record, the history.
        The loop writes it on rank 0 with its own call of ``save_checkpoint`` (atomic: a crash leaves the previous
        checkpoint), the one place a test can stop a run right after a checkpoint (tests/test_augment.py)."""
        return {**state, **self.record, "epoch": epoch, "history": self.history, "version": __version__}

    def end_epoch(self, line: str, note: str | None = None) -> None:
        """After the epoch's checkpoint: rank 0 rewrites the history table and prints the epoch's ``line`` (when
        showing progress) and a ``note`` (always); every rank waits for it, so that all go on together."""
        if self.ctx.is_main:
            atomic_write_table(pd.DataFrame(self.history), self.out / self.history_name)
            if self.progress:
                print(line)
            if note:
                print(note)
        barrier(self.ctx)

    def finish(self, name: str, state: dict[str, Any]) -> Path:
        """Write the artifact ``name`` (rank 0): the loop's ``state`` with the record and the history. Every rank
        may read it once this returns."""
        path = self.out / name
        if self.ctx.is_main:
            save_checkpoint({**state, **self.record, "history": self.history, "version": __version__}, path)
        barrier(self.ctx)
        return path


def open_run(
    out: str | Path,
    record: dict[str, Any],
    *,
    resume: bool,
    ctx: DistContext,
    seed: int,
    progress: bool = True,
    history_name: str = "loss.csv",
    config: dict[str, Any] | None = None,
) -> RunDir:
    """Open the run folder ``out`` for a loop whose run is described by ``record`` (:func:`run_record`).

    A folder with a checkpoint is refused unless ``resume``; with ``resume`` its checkpoint is loaded (onto this
    rank's device) and refused when :func:`check_resumable` finds another run, else the returned RunDir starts after
    its last epoch with its history. Rank 0 then creates the folder and writes ``config`` as config.json."""
    run = RunDir(Path(out), record, ctx, seed, progress and ctx.is_main, history_name)
    if run.checkpoint.exists() and not resume:
        raise DebiasError(f"{run.out} already holds a training run; pass --resume to continue it or choose another --out")
    barrier(ctx)  # every rank has looked at the folder before rank 0 writes to it

    if resume and run.checkpoint.exists():
        run.resumed = load_checkpoint(run.checkpoint, map_location=ctx.device)
        check_resumable(run.resumed, record, run.out)
        run.start_epoch, run.history = int(run.resumed["epoch"]), list(run.resumed["history"])
        if run.progress:
            print(f"resuming {run.out} after epoch {run.start_epoch}")
    elif resume and run.progress:
        print(f"no checkpoint in {run.out}; starting a new run")

    if ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        if config is not None:
            write_json(config, run.out / "config.json")
    return run


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One update of ``optimizer``'s parameters down ``loss``'s gradient. Under DDP the backward pass averages the
    gradients over the ranks, so every rank takes the same step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class EpochMeter:
    """An epoch's loss parts, summed weighted by the rows of each step, and their means over every rank's rows; and
    the seconds since it was made (at the start of the epoch's training pass)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.rows = 0
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def add(self, parts: dict[str, float], rows: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * rows
        self.rows += rows

    def means(self, ctx: DistContext) -> tuple[dict[str, float], float]:
        """(each part's mean, rows seen), over all ranks: a collective, every rank calls it."""
        reduced = all_reduce_sum({**self.sums, "_rows": float(self.rows)}, ctx)
        total = reduced.pop("_rows")
        return {k: reduced[k] / total for k in self.sums}, total


def find_artifact(run_dir: str | Path, name: str, missing: str) -> Path:
    """The artifact ``name`` of a run folder (or ``run_dir`` itself, a file); a one-line error that tells an
    unfinished run (it has a checkpoint: resume it) from no run (``missing``)."""
    run = Path(run_dir)
    path = run / name if run.is_dir() else run
    if not path.exists():
        if (run / CHECKPOINT).exists():
            raise DebiasError(f"{run} has a checkpoint but no {name}: training did not finish; resume it with --resume")
        raise DebiasError(missing)
    return path
