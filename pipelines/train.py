"""`debias train`: load a source, pick the model (beta-VAE, or DB-VAE when a label is given) and run the loop."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from debias.data import load_images
from debias.distributed import DistContext, distributed_job
from debias.errors import DebiasError
from debias.models import VAEConfig
from debias.training import DataDescription, TrainConfig, encode_labels, train_vae


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
    resume: bool = False
    progress: bool = True


def vae_config(**options: object) -> VAEConfig:
    """A VAEConfig from command-line options; an out-of-range option is a one-line user error, not a traceback."""
    try:
        return VAEConfig(**options)
    except ValueError as exc:
        raise DebiasError(str(exc)) from exc


def run_train(job: TrainJob) -> Path:
    # Under torchrun: join the process group first, so that only rank 0 reports progress from here on. Every rank
    # loads the same images; the decode cache is safe to build from several processes at once (the first takes a
    # lock and builds, the others wait for it and read its store; see debias/data/cache.py).
    with distributed_job(job.train.device) as ctx:
        return _run_train(job, ctx)


def _run_train(job: TrainJob, ctx: DistContext) -> Path:
    progress = job.progress and ctx.is_main
    data = load_images(job.data, where=job.where, image_size=job.image_size, channels=job.channels, progress=progress)
    labels, classes, vae_class, n_unlabelled = None, [], None, 0
    if job.label is not None:
        if job.label not in data.table.columns:
            raise DebiasError(f"--label {job.label!r} is not a column of the data (columns: {', '.join(data.table.columns)})")
        # Rows without a label are reported and left out, like unreadable images, and counted in the outputs.
        has_label = data.table[job.label].notna().to_numpy()
        n_unlabelled = int((~has_label).sum())
        if n_unlabelled:
            if not has_label.any():
                raise DebiasError(f"--label {job.label!r} has no value in any of the {len(data)} rows")
            if ctx.is_main:  # reported like unreadable images, also with --quiet
                print(f"{n_unlabelled} rows without a {job.label!r} value left out", file=sys.stderr)
            data = data.subset(np.flatnonzero(has_label))
        labels, classes = encode_labels(data.table[job.label])
        if len(classes) < 2:
            raise DebiasError(f"--label {job.label!r} has a single value ({classes[0]}); a classifier needs two or more")
        if job.vae_class is not None:
            if job.vae_class not in classes:
                raise DebiasError(f"--vae-class {job.vae_class!r} is not a value of {job.label!r} ({', '.join(classes)})")
            vae_class = classes.index(job.vae_class)
    elif job.vae_class is not None:
        raise DebiasError("--vae-class needs --label")
    model_config = vae_config(
        image_size=job.image_size,
        channels=data.channels,
        latent_dim=job.latent_dim,
        beta=job.beta,
        width=job.width,
        n_classes=len(classes),
        classes=classes,
        vae_class=vae_class,
    )
    desc = DataDescription(
        source=job.data,
        where=list(job.where),
        fingerprint=data.fingerprint,
        n_images=len(data),
        n_skipped=len(data.skipped),
        label=job.label,
        n_unlabelled=n_unlabelled,
    )
    return train_vae(
        data,
        model_config,
        job.train,
        job.out,
        data_desc=desc,
        labels=labels,
        resume=job.resume,
        progress=job.progress,
        ctx=ctx,
    )
