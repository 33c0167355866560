"""The VAE / DB-VAE training loop: one epoch after another, a checkpoint after each, resumable after a crash.

RUN_DIR layout:
    checkpoint.pt  model + optimizer + epoch + configs + data description + loss history (rewritten atomically
                   after every epoch; ``resume=True`` continues from it: :mod:`debias.training.run_dir`)
    model.pt       the trained model for audits and scoring (weights, model config, data description, history)
    config.json    the model and training configuration, human readable
    loss.csv       one row per epoch: loss parts, images/s
    loss.png       the loss curve

Under ``torchrun --nproc-per-node N`` the loop runs data-parallel (DDP, see :mod:`debias.runtime.distributed`): every rank
draws the same epoch order and trains on its slice, ``batch_size`` stays the global batch, and rank 0 alone writes
the files above and shows progress.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from debias.data import ImageSet
from debias.data.splits import calibration_split
from debias.errors import DebiasError
from debias.models import ConvVAE, VAEConfig, vae_loss
from debias.models.contrastive import ContrastiveConfig
from debias.runtime.checkpoint import atomic_savefig, load_checkpoint, save_checkpoint
from debias.runtime.device import autocast, effective_precision
from debias.runtime.distributed import (
    DistContext,
    ModelWithLoss,
    init_distributed,
    per_rank_batch,
    wrap,
)
from debias.runtime.progress import epoch_line, progress_bar
from debias.training.contrastive import (
    SUBDIR,
    ContrastiveTrainConfig,
    train_contrastive,
)
from debias.training.run_dir import (
    EpochMeter,
    find_artifact,
    open_run,
    optimizer_step,
    run_record,
)

MODEL = "model.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"


@dataclass
class DataDescription:
    """What the model was trained on; stored in every checkpoint so that a resume on other data is refused."""

    source: str
    where: list[str]
    fingerprint: str
    n_images: int
    n_skipped: int
    label: str | None = None
    n_unlabelled: int = 0  # rows left out because their label was missing
    # rows held out of training for the novelty detector's calibration (debias.data.splits.calibration_split of
    # n_images rows with this fraction and seed); 0 = none held out
    calibration_fraction: float = 0.0
    calibration_seed: int = 0
    n_calibration: int = 0


def encode_labels(values: pd.Series, classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Label column -> class indices; classes are the sorted string values unless given."""
    as_str = values.astype(str)
    if classes is None:
        classes = sorted(as_str.unique().tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(as_str) - set(lookup))
    if unknown:
        raise DebiasError(f"label values not seen in training: {unknown[:5]}")
    return as_str.map(lookup).to_numpy(dtype=np.int64), classes


def train_vae(
    data: ImageSet,
    model_config: VAEConfig,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    data_desc: DataDescription,
    labels: np.ndarray | None = None,
    resume: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> Path:
    """Train (or resume training) and return the path of model.pt. ``ctx``: the torchrun context (default: joined
    here from the environment; single-process without torchrun)."""
    ctx = ctx or init_distributed(config.device)
    device = ctx.device
    local_batch = per_rank_batch(config.batch_size, ctx)
    run = open_run(
        out_dir, run_record(model_config, config, data=asdict(data_desc)), resume=resume, ctx=ctx, seed=config.seed,
        progress=progress,
        config={"model": model_config.to_dict(), "train": {**asdict(config), "precision": effective_precision(device)},
                "data": asdict(data_desc)},
    )

    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = ConvVAE(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if run.resumed is not None:
        model.load_state_dict(run.resumed["model"])
        optimizer.load_state_dict(run.resumed["optimizer"])

    step = wrap(ModelWithLoss(model, vae_loss), ctx)  # every parameter takes part in the VAE / DB-VAE loss
    y_all = torch.from_numpy(labels) if labels is not None else None
    n = len(data)
    for epoch in range(run.start_epoch, config.epochs):
        run.seed_epoch(epoch)
        rows = run.shard(epoch, torch.randperm(n).numpy(), "vae")  # the same global order on every rank
        step.train()
        meter = EpochMeter()
        with progress_bar(f"epoch {epoch + 1}/{config.epochs}", total=len(rows) * ctx.world_size, enabled=run.progress) as bar:
            for start in range(0, len(rows), local_batch):
                idx = np.sort(rows[start : start + local_batch])  # sorted reads suit the memmap
                x = data.batch(idx).to(device, non_blocking=True)
                y = y_all[idx].to(device) if y_all is not None else None
                with autocast(device):
                    loss, parts = step(x, y)
                optimizer_step(optimizer, loss)
                meter.add(parts, len(idx))
                bar.advance(len(idx) * ctx.world_size, loss=parts["loss"])
        elapsed = meter.seconds
        means, seen = meter.means(ctx)  # rank 0 logs the means over every rank's rows
        row = {"epoch": epoch + 1, **means, "images_per_s": seen / elapsed}
        run.history.append(row)
        if ctx.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            save_checkpoint(run.checkpoint_state(epoch + 1, state), run.checkpoint)
            _plot_history(run.history, run.out)
        run.end_epoch(epoch_line(row))

    # The plain module's weights: the model loads without DDP or torchrun.
    return run.finish(MODEL, {"model": model.state_dict()})


def _plot_history(history: list[dict[str, Any]], out: Path) -> None:
    df = pd.DataFrame(history)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    for col in ("loss", "recon", "kl", "ce"):
        if col in df:
            ax.plot(df["epoch"], df[col], marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.set_yscale("symlog")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    atomic_savefig(fig, out / "loss.png", dpi=100)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ConvVAE, dict[str, Any]]:
    """A trained model in eval mode and its stored metadata (model_config, data, history)."""
    path = find_artifact(run_dir, MODEL, f"no trained model at {run_dir} (expected {MODEL} from 'debias train')")
    meta = load_checkpoint(path, map_location=device)
    model = model_from_checkpoint(meta, path)
    model.to(device).eval()
    return model, meta


_MAX_WIDTH = 1024  # channels of the first convolution; the stored config is checked before anything is allocated
_MAX_LATENT = 4096


def model_from_checkpoint(meta: Any, path: Path) -> ConvVAE:
    """The ConvVAE a checkpoint describes, with its weights, or a one-line DebiasError when the file loads but its
    configuration is missing, malformed, oversized, or does not fit its weights."""
    bad = f"{path} is not a debias model"
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict) or not isinstance(
        meta.get("model"), dict
    ):
        raise DebiasError(f"{bad} (no model_config / model entries)")
    cfg = dict(meta["model_config"])
    for key, limit in (("width", _MAX_WIDTH), ("latent_dim", _MAX_LATENT), ("n_classes", 100_000)):
        value = cfg.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise DebiasError(f"{bad}: model_config.{key} = {value!r} (expected an integer in 0..{limit})")
    try:
        model = ConvVAE(VAEConfig(**cfg))
    except (TypeError, ValueError) as exc:
        raise DebiasError(f"{bad}: bad model_config ({str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(meta["model"])
    except (RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise DebiasError(f"{bad}: its weights do not fit its model_config ({first[1].strip() if len(first) > 1 else first[0] if first else type(exc).__name__})") from None
    return model


def vae_config(**options: object) -> VAEConfig:
    """A VAEConfig from user options; an out-of-range option is a one-line user error, not a traceback."""
    try:
        return VAEConfig(**options)
    except ValueError as exc:
        raise DebiasError(str(exc)) from exc


def fit_vae_on(
    data: ImageSet,
    out: Path,
    config: TrainConfig,
    *,
    latent_dim: int = 32,
    beta: float = 1.0,
    width: int = 32,
    label: str | None = None,
    vae_class: str | None = None,
    source: str | None = None,
    where: list[str] | None = None,
    calibration_fraction: float = 0.0,
    contrastive: ContrastiveTrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> Path:
    """Pick the model for ``data`` (a beta-VAE, or a DB-VAE with a class head when ``label`` names a column) and
    train it into ``out``: what `debias train` and :func:`debias.train_vae` both run. Rows without a label are
    reported and left out. ``calibration_fraction`` of the rows (seeded by ``config.seed``) are held out of training
    for the novelty detector's conformal calibration (:func:`debias.data.splits.calibration_split`). With
    ``contrastive``, the novelty score's contrastive encoder is then trained on exactly the VAE's rows into
    ``out/contrastive/`` (:mod:`debias.training.contrastive`): the calibration rows stay new to every fitted part of
    the score, or their p-values would not be exchangeable with those of new images. Returns the path of model.pt."""
    labels, classes, vae_class_index, n_unlabelled = None, [], None, 0
    if label is not None:
        if label not in data.table.columns:
            raise DebiasError(f"--label {label!r} is not a column of the data (columns: {', '.join(data.table.columns)})")
        has_label = data.table[label].notna().to_numpy()
        n_unlabelled = int((~has_label).sum())
        if n_unlabelled:
            if not has_label.any():
                raise DebiasError(f"--label {label!r} has no value in any of the {len(data)} rows")
            if ctx is None or ctx.is_main:  # reported like unreadable images, also with --quiet
                print(f"{n_unlabelled} rows without a {label!r} value left out", file=sys.stderr)
            data = data.subset(np.flatnonzero(has_label))
        labels, classes = encode_labels(data.table[label])
        if len(classes) < 2:
            raise DebiasError(f"--label {label!r} has a single value ({classes[0]}); a classifier needs two or more")
        if vae_class is not None:
            if vae_class not in classes:
                raise DebiasError(f"--vae-class {vae_class!r} is not a value of {label!r} ({', '.join(classes)})")
            vae_class_index = classes.index(vae_class)
    elif vae_class is not None:
        raise DebiasError("--vae-class needs --label")
    if contrastive is not None and contrastive.use_labels and label is None:
        raise DebiasError("--contrastive-labels needs --label")
    model_config = vae_config(
        image_size=data.image_size, channels=data.channels, latent_dim=latent_dim, beta=beta, width=width,
        n_classes=len(classes), classes=classes, vae_class=vae_class_index,
    )
    fingerprint, n_all, n_cal = data.fingerprint, len(data), 0
    if calibration_fraction >= 0.5:
        raise DebiasError(f"--calibration-fraction must be below 0.5, got {calibration_fraction}")
    if calibration_fraction > 0:
        try:
            train_rows, cal_rows = calibration_split(len(data), calibration_fraction, config.seed)
        except ValueError:  # too few images to spare any: train on all, the detector calibrates on seen images
            if ctx is None or ctx.is_main:
                print(f"{len(data)} images are too few to hold out {calibration_fraction:.0%} for the novelty "
                      "calibration; training on all of them", file=sys.stderr)
        else:
            data, n_cal = data.subset(train_rows), len(cal_rows)
            labels = labels[train_rows] if labels is not None else None
    desc = DataDescription(
        source=source or data.source, where=list(where or []), fingerprint=fingerprint, n_images=n_all,
        n_skipped=len(data.skipped), label=label, n_unlabelled=n_unlabelled,
        calibration_fraction=float(calibration_fraction) if n_cal else 0.0, calibration_seed=config.seed,
        n_calibration=n_cal,
    )
    path = train_vae(data, model_config, config, out, data_desc=desc, labels=labels, resume=resume,
                     progress=progress, ctx=ctx)
    if contrastive is not None and contrastive.epochs > 0:
        if len(data) < 2 * (ctx.world_size if ctx is not None else 1):
            if ctx is None or ctx.is_main:
                print(f"{len(data)} training images are too few for the contrastive encoder; the novelty score will "
                      "use the VAE's statistics only", file=sys.stderr)
        else:
            train_contrastive(data, ContrastiveConfig(image_size=data.image_size, channels=data.channels), contrastive,
                              Path(out) / SUBDIR, data_desc=asdict(desc), resume=resume, progress=progress, ctx=ctx,
                              labels=labels if contrastive.use_labels else None)
    return path
