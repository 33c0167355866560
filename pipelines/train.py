"""`debias train`: load a source, pick the model (beta-VAE, or DB-VAE when a label is given) and run its loop; then
train the novelty score's contrastive encoder on the same training rows (``RUN_DIR/contrastive/``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from debias.data import load_images
from debias.data.splits import DEFAULT_CALIBRATION_FRACTION
from debias.runtime.distributed import DistContext, distributed_job
from debias.training.contrastive import ContrastiveTrainConfig
from debias.training.vae import TrainConfig, fit_vae_on


@dataclass
class TrainJob:
    data: str
    out: Path
    where: list[str] = field(default_factory=list)
    label: str | None = None
    vae_class: str | None = None  # DB-VAE: apply the VAE loss to this label value only (default: every sample)
    image_size: int = 64
    channels: int | None = None
    latent_dim: int = 32
    beta: float = 1.0
    width: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION  # held out of training for the novelty calibration
    contrastive_epochs: int = 15  # the novelty score's contrastive encoder (issue 16); 0 = none, VAE statistics only
    contrastive_min_steps: int = 600  # ... and at least this many steps (more epochs on small sets; 0 = exactly epochs)
    contrastive_labels: bool = False  # the encoder learns from --label (SupCon) instead of label-free
    resume: bool = False
    progress: bool = True


def run_train(job: TrainJob) -> Path:
    # Under torchrun: join the process group first, so that only rank 0 reports progress from here on. Every rank
    # loads the same images; the decode cache is safe to build from several processes at once (the first takes a
    # lock and builds, the others wait for it and read its store; see debias/data/cache.py).
    with distributed_job(job.train.device) as ctx:
        return _run_train(job, ctx)


def _run_train(job: TrainJob, ctx: DistContext) -> Path:
    progress = job.progress and ctx.is_main
    data = load_images(job.data, where=job.where, image_size=job.image_size, channels=job.channels, progress=progress)
    contrastive = ContrastiveTrainConfig(epochs=job.contrastive_epochs, min_steps=job.contrastive_min_steps,
                                         seed=job.train.seed, device=job.train.device, use_labels=job.contrastive_labels)
    return fit_vae_on(
        data, job.out, job.train, latent_dim=job.latent_dim, beta=job.beta, width=job.width, label=job.label,
        vae_class=job.vae_class, source=job.data, where=list(job.where), calibration_fraction=job.calibration_fraction,
        contrastive=contrastive, resume=job.resume, progress=job.progress,
        ctx=ctx,
    )
