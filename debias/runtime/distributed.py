"""Data-parallel training under `torchrun`: one small API that every training loop uses.

Every rank draws the *same* global epoch order from the same seed (a permutation for ERM, weighted draws with
replacement for a reweighted epoch) and keeps only its own slice of it. The union of the slices is exactly the epoch a
single process would see, so rarity weights keep their meaning across ranks: this is a distributed *weighted* sampler
without the per-rank renormalisation that `DistributedSampler` + `WeightedRandomSampler` would need. Without torchrun
(no WORLD_SIZE in the environment) everything here is a no-op and the loops run single-process.

``--batch-size`` stays the *global* batch: each rank trains on ``per_rank_batch`` = batch / world size rows, and as
rank r takes positions r, r+W, ... of the global order, the union of the ranks' k-th batches is exactly the k-th batch
of a single-process run. DDP averages the ranks' gradients, so a step sees the same mean gradient over the same rows.

Debugging aid: with ``DEBIAS_RECORD_ROWS=DIR`` in the environment, every rank saves the rows it trains on in each epoch
to ``DIR/<tag>-epoch<E>-rank<R>.npy`` (:func:`record_rows`; the tests use it to check the sampling semantics).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from debias.errors import DebiasError
from debias.runtime.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and shows progress; the others only compute."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU), or return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise DebiasError(f"rank {rank} wants cuda:{local_rank}, but only {torch.cuda.device_count()} GPUs exist")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shard(order: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's slice of a global epoch order (rank r takes positions r, r+W, r+2W, ...).

    The order is first padded by wrapping around so that every rank gets the same number of rows, hence the same number
    of batches: DDP's gradient all-reduce needs every rank to step together.
    """
    if not ctx.enabled:
        return order
    per_rank = -(-len(order) // ctx.world_size)
    padded = np.resize(order, per_rank * ctx.world_size)  # np.resize repeats from the start
    return padded[ctx.rank :: ctx.world_size]


def wrap(model: nn.Module, ctx: DistContext, *, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel when running under torchrun; the model itself otherwise.

    ``find_unused_parameters``: set it when a forward pass leaves some parameters out of the loss (the classifier's
    cross-entropy never runs the decoder); DDP otherwise stops at the next step with an error, still waiting for
    their gradients.
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


class ModelWithLoss(nn.Module):
    """A model and its loss function as one module: ``step(*batch) == loss_fn(model, *batch)``.

    DDP synchronises gradients only for work done inside its own ``forward``; the loss functions call ``model(x)``,
    ``model.encode(x)`` and read ``model.config``, which a DDP wrapper would not pass through. Wrapping this module
    instead keeps the loss functions written against the plain model and routes the whole step through DDP.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch: Any) -> Any:
        return self.loss_fn(self.model, *batch)


def per_rank_batch(batch_size: int, ctx: DistContext) -> int:
    """Rows per rank per step: ``batch_size`` is the global batch, split evenly over the ranks."""
    if batch_size % ctx.world_size:
        raise DebiasError(
            f"--batch-size {batch_size} is the global batch and must be a multiple of the {ctx.world_size} processes"
        )
    return batch_size // ctx.world_size


def seed_rank_noise(seed: int, ctx: DistContext) -> None:
    """Give this rank its own stream of training noise (the VAE's reparameterisation), after the draws every rank
    must share (the epoch order) are made. Rank 0 keeps the stream a single process would use, so single-process runs
    are unchanged; without this every rank would draw the same noise for different rows."""
    if ctx.rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, ctx.rank]).generate_state(1)[0]))


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable: arrays, dicts, None). Used where a result must agree exactly across
    ranks (the epoch's sampling weights) although only rank 0 computed it."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def record_rows(tag: str, epoch: int, rows: np.ndarray, ctx: DistContext) -> None:
    """Save the rows this rank trains on in ``epoch`` when ``DEBIAS_RECORD_ROWS`` names a folder (debugging, tests)."""
    folder = os.environ.get("DEBIAS_RECORD_ROWS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, f"{tag}-epoch{epoch}-rank{ctx.rank}.npy"), np.asarray(rows, dtype=np.int64))


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: for messages printed outside a training loop (the CLI's last line)."""
    return os.environ.get("RANK", "0") == "0"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP, and the model inside a :class:`ModelWithLoss` (what checkpoints store, so that they load
    single-process)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner.model if isinstance(inner, ModelWithLoss) else inner


def all_reduce_sum(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum per-rank running totals (losses x rows) so that rank 0 logs the epoch's true means."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if ctx.device.type == "cuda":
        t = t.to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist()))


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on at least one: ranks stop a loop together (a time budget runs out
    at slightly different steps on each), or the others would wait forever in the next collective."""
    if not ctx.enabled:
        return flag
    return all_reduce_sum({"flag": float(flag)}, ctx)["flag"] > 0


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_job(device: str = "auto") -> Iterator[DistContext]:
    """A whole job's process-group membership: joined first (so only rank 0 reports progress from then on), left at
    the end even on an error. Single-process without torchrun."""
    ctx = init_distributed(device)
    try:
        yield ctx
        # Leave together: rank 0 alone writes the outputs, and the others must not tear the group down under it.
        # Skipped on an error, where a barrier could wait for a rank that is gone. (The SIGABRT at exit once blamed on
        # this was a gloo thread racing the interpreter's shutdown: see the CLI's _leave.)
        barrier(ctx)
    finally:
        cleanup(ctx)
