"""The CycleGAN training loop (Zhu et al., ICCV 2017): translate images of domain A (common) into domain B (rare).

The paper's recipe: least-squares GAN losses, cycle-consistency weight 10, identity weight 5 (0.5 x the cycle weight),
discriminators trained on a pool of the last 50 generated images, Adam with lr 2e-4 and betas (0.5, 0.999), the
learning rate constant for the first half of the epochs and decayed linearly towards 0 over the second half.

An epoch is max(|A|, |B|) pairs, as in the reference implementation (its unaligned dataset has the larger domain's
length): the larger domain is seen once, the smaller one in as many shuffled passes as it takes (a rare domain of 240
images beside 4,760 common ones: 20 passes), so that the --epochs schedule means what it means in the paper whatever
the domains' sizes. A run can also end early at ``max_steps`` or ``max_minutes``: the epoch in progress is then
recorded as far as it went, saved, and the generators are written (``resume=True`` with more epochs continues).

RUN_DIR layout:
    checkpoint.pt   both generators, both discriminators, both optimizers and LR schedules, the image pools, epoch,
                    configs, data fingerprint, loss history (atomic, after every epoch; ``resume=True`` continues)
    generators.pt   G_AB and G_BA for translation (weights, model config, data description)
    config.json, loss.csv, samples/epoch_NNN.png (rows: real A, A->B, real B, B->A)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from debias.data import ImageSet
from debias.models.cyclegan import CycleGANConfig, PatchDiscriminator, ResnetGenerator
from debias.runtime import distributed as dist
from debias.runtime.checkpoint import load_checkpoint, save_checkpoint
from debias.runtime.device import autocast
from debias.runtime.progress import TrainingClock, epoch_line, progress_bar
from debias.training.gan import save_image_grid, to_uint8
from debias.training.run_dir import (
    EpochMeter,
    find_artifact,
    open_run,
    optimizer_step,
    run_record,
)
from debias.training.vae import DataDescription

GENERATORS = "generators.pt"


@dataclass
class CycleGANTrainConfig:
    epochs: int = 20
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_cycle: float = 10.0
    lambda_identity: float = 5.0
    pool_size: int = 50
    grid_size: int = 8  # images per row of the sample grid
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None  # end the run after this many steps of this process (a budget, not an identity)
    max_minutes: float | None = None  # or after this much wall time


class ImagePool:
    """The last ``size`` generated images (Shrivastava et al. 2017): half of what the discriminator sees as fake is
    drawn from the pool, so it does not just chase the generator's latest output."""

    def __init__(self, size: int = 50) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand(1).item() < 0.5:  # return an older image and keep this one in its place
                i = int(torch.randint(0, self.size, (1,)).item())
                out.append(self.images[i].clone())
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"images": torch.stack(self.images).cpu() if self.images else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.images = [img.to(device) for img in state["images"]] if state["images"].numel() else []


def linear_decay(epochs: int):
    """LambdaLR factor per epoch (0-based): 1 for the first half, then down by 1 / (decay epochs + 1) per epoch to
    1 / (decay epochs + 1) in the last one (the reference implementation's rule)."""
    constant = (epochs + 1) // 2  # a single epoch keeps the full rate

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - constant) / float(epochs - constant + 1)

    return factor


def epoch_pairs(n_a: int, n_b: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Row orders of A and B for one epoch, each max(n_a, n_b) long: shuffled passes over each domain."""
    rng = np.random.default_rng([seed, epoch])
    n = max(n_a, n_b)

    def passes(k: int) -> np.ndarray:
        return np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n]

    return passes(n_a), passes(n_b)


def train_cyclegan(
    domain_a: ImageSet,
    domain_b: ImageSet,
    model_config: CycleGANConfig,
    config: CycleGANTrainConfig,
    out_dir: str | Path,
    *,
    data_desc: DataDescription,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or resume) and return the path of generators.pt."""
    ctx = dist.init_distributed(config.device)
    device = ctx.device
    batch_size = dist.per_rank_batch(config.batch_size, ctx)  # --batch-size is the global batch
    run = open_run(
        out_dir, run_record(model_config, config, data=asdict(data_desc)), resume=resume, ctx=ctx, seed=config.seed,
        progress=progress, config={"model": model_config.to_dict(), "train": asdict(config), "data": asdict(data_desc)},
    )

    torch.manual_seed(config.seed)
    g_ab, g_ba = ResnetGenerator(model_config).to(device), ResnetGenerator(model_config).to(device)
    d_a, d_b = PatchDiscriminator(model_config).to(device), PatchDiscriminator(model_config).to(device)
    opt_g = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=config.lr, betas=config.betas)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, linear_decay(config.epochs))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, linear_decay(config.epochs))
    pool_a, pool_b = ImagePool(config.pool_size), ImagePool(config.pool_size)  # fakes of A and of B
    if run.resumed is not None:
        for part, key in ((g_ab, "g_ab"), (g_ba, "g_ba"), (d_a, "d_a"), (d_b, "d_b"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            part.load_state_dict(run.resumed[key])
        # The schedule is a function of the epoch (and of --epochs, which a resume may change): set it from them.
        for sched in (sched_g, sched_d):
            sched.last_epoch = run.start_epoch
            for group, base_lr, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base_lr * factor(run.start_epoch)  # what LambdaLR computes after start_epoch steps
        pool_a.load_state_dict(run.resumed["pool_a"], device)
        pool_b.load_state_dict(run.resumed["pool_b"], device)

    gab_t, gba_t, da_t, db_t = (dist.wrap(m, ctx) for m in (g_ab, g_ba, d_a, d_b))
    k = min(config.grid_size, len(domain_a), len(domain_b))
    grid_a = domain_a.batch(np.arange(k)).mul(2).sub(1)
    grid_b = domain_b.batch(np.arange(k)).mul(2).sub(1)

    steps_per_epoch = -(-len(dist.shard(np.arange(max(len(domain_a), len(domain_b))), ctx)) // batch_size)
    clock = TrainingClock("CycleGAN", steps_per_epoch, config.epochs - run.start_epoch, max_steps=config.max_steps,
                          max_minutes=config.max_minutes, report=run.progress)
    for epoch in range(run.start_epoch, config.epochs):
        run.seed_epoch(epoch)
        rows_a, rows_b = epoch_pairs(len(domain_a), len(domain_b), config.seed, epoch)
        # Each rank its own image-pool draws from here on (seeding it twice over is seeding it once).
        rows_a, rows_b = run.shard(epoch, rows_a, "cyclegan-a"), run.shard(epoch, rows_b, "cyclegan-b")
        for m in (g_ab, g_ba, d_a, d_b):
            m.train()
        meter = EpochMeter()
        stopped = None
        with progress_bar(f"CycleGAN epoch {epoch + 1}/{config.epochs}", total=len(rows_a), enabled=run.progress) as bar:
            for start in range(0, len(rows_a), batch_size):
                real_a = _batch(domain_a, rows_a[start : start + batch_size], device)
                real_b = _batch(domain_b, rows_b[start : start + batch_size], device)
                b = len(real_a)

                # Generators: fool both discriminators (LSGAN: D(fake) -> 1), cycle back, leave the target domain alone.
                with autocast(device):
                    fake_b, fake_a = gab_t(real_a), gba_t(real_b)
                    rec_a, rec_b = gba_t(fake_b), gab_t(fake_a)
                    idt_b, idt_a = gab_t(real_b), gba_t(real_a)
                    pred_fake_b, pred_fake_a = db_t(fake_b).float(), da_t(fake_a).float()
                adv = F.mse_loss(pred_fake_b, torch.ones_like(pred_fake_b)) + F.mse_loss(pred_fake_a, torch.ones_like(pred_fake_a))
                cycle = F.l1_loss(rec_a.float(), real_a) + F.l1_loss(rec_b.float(), real_b)
                identity = F.l1_loss(idt_b.float(), real_b) + F.l1_loss(idt_a.float(), real_a)
                g_loss = adv + config.lambda_cycle * cycle + config.lambda_identity * identity
                optimizer_step(opt_g, g_loss)

                # Discriminators: real -> 1, pooled fakes -> 0, each loss halved as in the paper.
                fake_b_pool = pool_b.query(fake_b.detach().float())
                fake_a_pool = pool_a.query(fake_a.detach().float())
                with autocast(device):
                    pb_real, pb_fake = db_t(torch.cat([real_b, fake_b_pool])).float().split(b)
                    pa_real, pa_fake = da_t(torch.cat([real_a, fake_a_pool])).float().split(b)
                d_b_loss = 0.5 * (F.mse_loss(pb_real, torch.ones_like(pb_real)) + F.mse_loss(pb_fake, torch.zeros_like(pb_fake)))
                d_a_loss = 0.5 * (F.mse_loss(pa_real, torch.ones_like(pa_real)) + F.mse_loss(pa_fake, torch.zeros_like(pa_fake)))
                optimizer_step(opt_d, d_a_loss + d_b_loss)

                parts = {
                    "g_loss": g_loss.item(),
                    "adv": adv.item(),
                    "cycle": cycle.item(),
                    "identity": identity.item(),
                    "d_a": d_a_loss.item(),
                    "d_b": d_b_loss.item(),
                }
                meter.add(parts, b)
                bar.advance(b, g=parts["g_loss"], cyc=parts["cycle"], d_a=parts["d_a"], d_b=parts["d_b"])
                clock.tick()
                if dist.any_rank(clock.exhausted, ctx):
                    stopped = clock.stop_reason or "another process's budget"
                    break
        lr = opt_g.param_groups[0]["lr"]  # this epoch's rate, before the schedule moves on
        sched_g.step()
        sched_d.step()
        elapsed = meter.seconds
        means, seen = meter.means(ctx)  # all ranks' totals
        row = {"epoch": epoch + 1, **means, "lr": lr, "pairs_per_s": seen / elapsed, "seconds": elapsed}
        if stopped:
            row["stopped_by"] = stopped
        run.history.append(row)
        if ctx.is_main:
            state = {"g_ab": g_ab.state_dict(), "g_ba": g_ba.state_dict(), "d_a": d_a.state_dict(),
                     "d_b": d_b.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                     "pool_a": pool_a.state_dict(), "pool_b": pool_b.state_dict()}
            save_checkpoint(run.checkpoint_state(epoch + 1, state), run.checkpoint)
            _save_samples(g_ab, g_ba, grid_a, grid_b, run.out / "samples" / f"epoch_{epoch + 1:03d}.png")
        run.end_epoch(epoch_line(row), clock.stopped_line(stopped, epoch + 1, int(seen), "pairs") if stopped else None)
        if stopped:
            break

    return run.finish(GENERATORS, {"g_ab": g_ab.state_dict(), "g_ba": g_ba.state_dict()})


def _batch(data: ImageSet, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    # Rows are read in their drawn order (not sorted) so that A and B stay paired as drawn.
    return data.batch(rows).to(device, non_blocking=True).mul_(2).sub_(1)


@torch.no_grad()
def _save_samples(g_ab: ResnetGenerator, g_ba: ResnetGenerator, a: torch.Tensor, b: torch.Tensor, path: Path) -> None:
    device = next(g_ab.parameters()).device
    a, b = a.to(device), b.to(device)
    rows = torch.cat([a, g_ab(a), b, g_ba(b)])
    save_image_grid(to_uint8(rows), path, columns=len(a))


def load_generators(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ResnetGenerator, ResnetGenerator, dict[str, Any]]:
    """G_AB and G_BA of a finished run, in eval mode, and the stored metadata."""
    path = find_artifact(run_dir, GENERATORS, f"no trained CycleGAN at {run_dir}")
    meta = load_checkpoint(path, map_location=device)
    config = CycleGANConfig(**meta["model_config"])
    nets = []
    for key in ("g_ab", "g_ba"):
        net = ResnetGenerator(config)
        net.load_state_dict(meta[key])
        nets.append(net.to(device).eval())
    return nets[0], nets[1], meta
