"""The GAN training loop: a DCGAN-family generator trained on rarity-weighted draws of the data.

Every epoch draws n rows with replacement in proportion to the rarity weights (an audit's ``weight`` column, or
weights computed from a VAE run), so the rare rows are seen many times more often and the generator spends its
capacity on the rare regions of the data. Without weights an epoch is a plain shuffled pass.

Per step: a discriminator step on real and fake images (non-saturating logistic loss, both DiffAugmented with the same
kind of random transforms), a generator step through the augmentation, and an exponential moving average (EMA) of the
generator's weights, which gives visibly cleaner samples than the last iterate and is what generation uses.

A run can end early at ``max_steps`` or ``max_minutes`` (a CPU budget): the epoch in progress is recorded as far as it
went and saved, and the generator is written; ``resume=True`` with more epochs continues from the next epoch.

RUN_DIR layout:
    checkpoint.pt   both networks, both optimizers, the EMA generator, epoch, configs, data fingerprint, loss history
                    (rewritten atomically after every epoch; ``resume=True`` continues from it bit-identically)
    generator.pt    the EMA generator for generation (weights, model config, data description)
    config.json     model and training configuration, human readable
    loss.csv        one row per epoch: mean losses, discriminator outputs, images/s, seconds
    samples/epoch_NNN.png  a grid from the EMA generator on fixed noise (and fixed labels) after every epoch
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from debias.data import ImageSet
from debias.errors import DebiasError
from debias.models.dcgan import DCGANConfig, Discriminator, Generator
from debias.runtime import distributed as dist
from debias.runtime.checkpoint import load_checkpoint, save_checkpoint
from debias.runtime.device import autocast
from debias.runtime.progress import TrainingClock, epoch_line, progress_bar
from debias.training.diffaugment import DiffAugmentConfig, diff_augment
from debias.training.run_dir import (
    EpochMeter,
    find_artifact,
    open_run,
    optimizer_step,
    run_record,
)
from debias.training.sampling import draw_epoch
from debias.training.vae import DataDescription

GENERATOR = "generator.pt"


@dataclass
class GANTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    d_lr: float | None = None  # the discriminator's rate (default: lr); above lr = TTUR (Heusel et al. 2017)
    betas: tuple[float, float] = (0.5, 0.999)  # DCGAN's Adam settings
    ema_decay: float = 0.999
    augment: DiffAugmentConfig = field(default_factory=DiffAugmentConfig)
    grid_size: int = 64  # images in each epoch's sample grid
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None  # end the run after this many steps of this process (a budget, not an identity)
    max_minutes: float | None = None  # or after this much wall time


def weights_digest(weights: np.ndarray | None) -> str:
    """What a checkpoint remembers of the sampling weights, so that a resume with other weights is refused."""
    if weights is None:
        return "uniform"
    return hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float64).tobytes()).hexdigest()[:16]


def epoch_rows(weights: np.ndarray | None, n: int, seed: int, epoch: int) -> np.ndarray:
    """The global row order of one epoch: a permutation, or n draws with replacement ∝ ``weights``.

    Seeded by (seed, epoch) only, so every rank of a distributed run and a resumed run draw the same order."""
    return draw_epoch(weights, n, np.random.default_rng([seed, epoch]))


@torch.no_grad()
def update_ema(ema: Generator, model: Generator, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * model, with d warmed up as (1 + step) / (10 + step) so that short runs average over
    their trained weights rather than stay at the random initialisation; buffers (BN statistics) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(arr, 1, -1)


def save_image_grid(images: np.ndarray, path: Path, columns: int = 8) -> None:
    """(B, H, W, C) uint8 -> one PNG, ``columns`` images per row, 2 px gaps."""
    b, h, w, c = images.shape
    rows = -(-b // columns)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path)


def grid_labels(config: DCGANConfig, k: int) -> torch.Tensor | None:
    """Labels for a sample grid: the classes in turn (each row of 8 cycles through them)."""
    return torch.arange(k) % config.n_classes if config.n_classes else None


def train_gan(
    data: ImageSet,
    model_config: DCGANConfig,
    config: GANTrainConfig,
    out_dir: str | Path,
    *,
    data_desc: DataDescription,
    labels: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or resume) and return the path of generator.pt. ``labels``: class indices, for a conditional model;
    ``weights``: sampling probabilities of the rows (None: uniform)."""
    if (labels is not None) != bool(model_config.n_classes):
        raise DebiasError("labels must be given exactly when the model is conditional")
    ctx = dist.init_distributed(config.device)
    device = ctx.device
    n = len(data)
    digest = weights_digest(weights)
    batch_size = dist.per_rank_batch(config.batch_size, ctx)  # --batch-size is the global batch
    run = open_run(
        out_dir, run_record(model_config, config, data=asdict(data_desc), weights=digest), resume=resume, ctx=ctx,
        seed=config.seed, progress=progress,
        config={"model": model_config.to_dict(), "train": asdict(config), "data": asdict(data_desc), "weights": digest},
    )

    torch.manual_seed(config.seed)
    generator = Generator(model_config).to(device)
    discriminator = Discriminator(model_config).to(device)
    ema = copy.deepcopy(generator).eval()
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.d_lr or config.lr, betas=config.betas)
    step = 0
    if run.resumed is not None:
        for part, key in ((generator, "generator"), (discriminator, "discriminator"), (ema, "ema"), (opt_g, "opt_g"),
                          (opt_d, "opt_d")):
            part.load_state_dict(run.resumed[key])
        step = int(run.resumed["step"])

    g_train, d_train = dist.wrap(generator, ctx), dist.wrap(discriminator, ctx)
    y_all = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    # Fixed noise and labels for the sample grids: the same images evolve from epoch to epoch.
    grid_noise = torch.Generator().manual_seed(config.seed + 1)
    grid_z = torch.randn(config.grid_size, model_config.z_dim, generator=grid_noise)
    grid_y = grid_labels(model_config, config.grid_size)

    steps_per_epoch = -(-len(dist.shard(np.arange(n), ctx)) // batch_size)
    clock = TrainingClock("GAN", steps_per_epoch, config.epochs - run.start_epoch, max_steps=config.max_steps,
                          max_minutes=config.max_minutes, report=run.progress)
    for epoch in range(run.start_epoch, config.epochs):
        run.seed_epoch(epoch)
        # Each rank its own z and augmentations from here on.
        rows = run.shard(epoch, epoch_rows(weights, n, config.seed, epoch), "gan")
        generator.train()
        discriminator.train()
        meter = EpochMeter()
        stopped = None
        with progress_bar(f"GAN epoch {epoch + 1}/{config.epochs}", total=len(rows), enabled=run.progress) as bar:
            for start in range(0, len(rows), batch_size):
                idx = np.sort(rows[start : start + batch_size])  # sorted reads suit the memmap
                real = data.batch(idx).to(device, non_blocking=True).mul_(2).sub_(1)
                y = y_all[idx].to(device) if y_all is not None else None
                b = len(idx)

                # Discriminator: real -> 1, fake -> 0; one forward over both (no batch-coupled layers in D).
                z = torch.randn(b, model_config.z_dim, device=device)
                with torch.no_grad(), autocast(device):
                    fake = g_train(z, y)
                both = torch.cat([real, fake.to(real.dtype)])
                y2 = torch.cat([y, y]) if y is not None else None
                with autocast(device):
                    # Minibatch-std groups of gcd(b, 4) consecutive images never straddle the real/fake boundary.
                    logits = d_train(_augment(both, config.augment), y2, group_size=math.gcd(b, 4)).float()
                d_loss = F.softplus(-logits[:b]).mean() + F.softplus(logits[b:]).mean()
                optimizer_step(opt_d, d_loss)

                # Generator: make D call its (augmented) samples real; the non-saturating loss of Goodfellow et al.
                z = torch.randn(b, model_config.z_dim, device=device)
                with autocast(device):
                    g_logits = d_train(_augment(g_train(z, y), config.augment), y, group_size=math.gcd(b, 4)).float()
                g_loss = F.softplus(-g_logits).mean()
                optimizer_step(opt_g, g_loss)
                update_ema(ema, generator, config.ema_decay, step)
                step += 1

                parts = {
                    "d_loss": d_loss.item(),
                    "g_loss": g_loss.item(),
                    "d_real": torch.sigmoid(logits[:b]).mean().item(),
                    "d_fake": torch.sigmoid(logits[b:]).mean().item(),
                }
                meter.add(parts, b)
                bar.advance(b, d=parts["d_loss"], g=parts["g_loss"])
                clock.tick()
                if dist.any_rank(clock.exhausted, ctx):
                    stopped = clock.stop_reason or "another process's budget"
                    break
        elapsed = meter.seconds
        means, seen = meter.means(ctx)  # all ranks' totals
        row = {"epoch": epoch + 1, **means, "images_per_s": seen / elapsed, "seconds": elapsed}
        if stopped:
            row["stopped_by"] = stopped
        run.history.append(row)
        if ctx.is_main:
            state = {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                     "ema": ema.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step}
            save_checkpoint(run.checkpoint_state(epoch + 1, state), run.checkpoint)
            with torch.no_grad():
                grid = to_uint8(ema(grid_z.to(device), _to(grid_y, device)))
            save_image_grid(grid, run.out / "samples" / f"epoch_{epoch + 1:03d}.png")
        run.end_epoch(epoch_line(row), clock.stopped_line(stopped, epoch + 1, int(seen), "images") if stopped else None)
        if stopped:
            break

    return run.finish(GENERATOR, {"generator": ema.state_dict()})


def _augment(x: torch.Tensor, config: DiffAugmentConfig) -> torch.Tensor:
    return diff_augment(x, config) if config.enabled else x


def _to(y: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return y.to(device) if y is not None else None


def load_generator(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """The trained (EMA) generator in eval mode and its stored metadata."""
    path = find_artifact(run_dir, GENERATOR, f"no trained generator at {run_dir}")
    meta = load_checkpoint(path, map_location=device)
    model = Generator(DCGANConfig(**meta["model_config"]))
    model.load_state_dict(meta["generator"])
    return model.to(device).eval(), meta
