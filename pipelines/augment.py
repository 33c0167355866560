"""`debias augment`: add new rare samples by generation (a rarity-weighted GAN) or translation (CycleGAN).

Outputs in the output folder DIR:
    images/gan_NNNNNN.png or images/cyclegan_NNNNNN.png   the synthetic images
    manifest.csv      path (relative to DIR), the label column (--label), the domain column (CycleGAN), synthetic
                      (True), method, and for CycleGAN source_path (the translated image's path in the source table);
                      `--data DIR/manifest.csv` reads it like any manifest
    combined.csv      with --merge-with ORIGINAL: the original manifest's rows (synthetic False) followed by the
                      synthetic ones (which take the single-valued --where filters, e.g. split=train), every path
                      absolute, so one `--data DIR/combined.csv` trains on both
    checkpoint.pt, generator.pt / generators.pt, config.json, loss.csv, samples/   the training run (see
                      debias.training.gan and debias.training.cyclegan)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from debias.data import ImageSet, load_images
from debias.data.sources import MANIFEST_SUFFIXES, parse_where
from debias.errors import DebiasError
from debias.models.cyclegan import CycleGANConfig, default_n_blocks
from debias.models.dcgan import DCGANConfig
from debias.runtime import distributed as dist
from debias.runtime.checkpoint import atomic_write_table
from debias.runtime.device import autocast, resolve_device
from debias.runtime.progress import progress_bar
from debias.training.cyclegan import (
    CycleGANTrainConfig,
    load_generators,
    train_cyclegan,
)
from debias.training.diffaugment import DiffAugmentConfig
from debias.training.gan import GANTrainConfig, load_generator, to_uint8, train_gan
from debias.training.sampling import read_scores
from debias.training.vae import DataDescription, encode_labels

METHODS = ("gan", "cyclegan")
AUDIT_DOMAINS = ("common", "rare")  # --from/--to values that split the data by rarity instead of by a column


@dataclass
class GANOptions:
    z_dim: int = 128
    width: int = 32
    ema_decay: float = 0.999
    d_lr: float | None = None  # the discriminator's learning rate (default: --lr)
    diffaugment: bool = True
    balanced_labels: bool = False  # generate every class equally often instead of in the weighted label mix


@dataclass
class CycleGANOptions:
    domain_column: str | None = None
    source: str | None = None  # --from: the common domain, translated
    target: str | None = None  # --to: the rare domain, translated into
    rare_quantile: float = 0.1  # --from common --to rare: the rarest share of the rows is domain B
    width: int = 32
    n_blocks: int | None = None  # default: by image size (debias.models.cyclegan.default_n_blocks)


@dataclass
class AugmentJob:
    method: str  # "gan" or "cyclegan"
    data: str
    out: Path
    n: int
    where: list[str] = field(default_factory=list)
    weights: Path | None = None  # an audit's scores.parquet/.csv
    model: Path | None = None  # or a VAE run directory to compute the rarity from
    label: str | None = None
    image_size: int = 64
    epochs: int = 20
    batch_size: int | None = None  # default: 64 (GAN), 8 (CycleGAN)
    max_steps: int | None = None  # training budget: end after this many steps (the epoch in progress is kept)
    max_minutes: float | None = None  # or after this much time
    lr: float = 2e-4
    seed: int = 0
    device: str = "auto"
    gan: GANOptions = field(default_factory=GANOptions)
    cyclegan: CycleGANOptions = field(default_factory=CycleGANOptions)
    merge_with: Path | None = None
    features: Path | None = None  # a VAE run on the same data: measure the quality of the output (OUT/quality/)
    resume: bool = False
    progress: bool = True


@dataclass
class AugmentResult:
    out: Path
    manifest: Path
    combined: Path | None
    n_images: int
    trained_on: int  # rows the model was trained on (GAN: all; CycleGAN: |A| + |B|)
    quality: Path | None = None  # quality.json, with --features
    is_main: bool = True  # False on the other ranks of a torchrun job: they train, rank 0 writes the outputs


def run_augment(job: AugmentJob) -> AugmentResult:
    # Under torchrun every rank trains; rank 0 alone then generates, measures and leaves the group last.
    with dist.distributed_job(job.device):
        return _run_augment(job)


def _run_augment(job: AugmentJob) -> AugmentResult:
    _validate(job)
    data = load_images(job.data, where=job.where, image_size=job.image_size, progress=job.progress)
    if job.label is not None and job.label not in data.table.columns:
        raise DebiasError(f"--label {job.label!r} is not a column of the data (columns: {', '.join(data.table.columns)})")
    if job.method == "gan":
        manifest, trained_on = _run_gan(job, data)
    else:
        manifest, trained_on = _run_cyclegan(job, data)
    if manifest is None:  # not rank 0 of a distributed run
        return AugmentResult(out=job.out, manifest=job.out / "manifest.csv", combined=None, n_images=0,
                             trained_on=trained_on, is_main=False)
    path = job.out / "manifest.csv"
    _write_csv(manifest, path)
    combined = None
    if job.merge_with is not None:
        combined = job.out / "combined.csv"
        _write_csv(merge_manifests(job.merge_with, path, job.where), combined)
    quality = _measure_quality(job) if job.features is not None else None
    return AugmentResult(out=job.out, manifest=path, combined=combined, n_images=len(manifest), trained_on=trained_on,
                         quality=quality)


def _measure_quality(job: AugmentJob) -> Path:
    """FID/KID, precision/recall and CAS of the new images against the real images they stand for: the target domain
    for CycleGAN (when it is a value of --domain-column), the trained-on rows for the GAN."""
    from debias.pipelines.synthetic_quality import QualityJob, run_quality

    cg = job.cyclegan
    real_where = list(job.where)
    group_by = job.label
    if job.method == "cyclegan" and cg.domain_column is not None:
        # Filters on one column are alternatives, so the target domain replaces them rather than joining them.
        real_where = [w for w in real_where if w.partition("=")[0].strip() != cg.domain_column]
        real_where.append(f"{cg.domain_column}={cg.target}")
    quality_job = QualityJob(
        real=job.data, real_where=real_where, synthetic=job.out, features=job.features, out=job.out / "quality",
        group_by=group_by, label=job.label, device=job.device, seed=job.seed, progress=job.progress,
    )
    run_quality(quality_job)
    return job.out / "quality" / "quality.json"


def _validate(job: AugmentJob) -> None:
    if job.method not in METHODS:
        raise DebiasError(f"--method must be gan or cyclegan, got {job.method!r}")
    if job.n < 1:
        raise DebiasError(f"--n must be at least 1, got {job.n}")
    if job.weights is not None and job.model is not None:
        raise DebiasError("give either --weights (an audit's scores) or --model (a VAE run), not both")
    cg = job.cyclegan
    if job.method == "gan" and (cg.domain_column or cg.source or cg.target):
        raise DebiasError("--domain-column, --from and --to are options of --method cyclegan")
    if job.method == "cyclegan":
        if cg.source is None or cg.target is None:
            raise DebiasError("--method cyclegan needs --from A --to B (values of --domain-column, or common/rare)")
        if cg.source == cg.target:
            raise DebiasError(f"--from and --to must differ, both are {cg.source!r}")
        if cg.domain_column is None:
            if (cg.source, cg.target) != AUDIT_DOMAINS:
                raise DebiasError("without --domain-column, the domains must be --from common --to rare (split by rarity)")
            if job.weights is None and job.model is None:
                raise DebiasError("--from common --to rare needs the rarity: --weights AUDIT_DIR/scores.parquet or --model RUN_DIR")
        if not 0.0 < cg.rare_quantile < 1.0:
            raise DebiasError(f"--rare-quantile must be between 0 and 1 (exclusive), got {cg.rare_quantile}")
        if job.gan.balanced_labels:
            raise DebiasError("--balanced-labels is an option of --method gan")
    if job.merge_with is not None:
        if not job.merge_with.is_file() or job.merge_with.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DebiasError(f"--merge-with must be an existing .csv or .parquet manifest, got {job.merge_with}")


# ------------------------------------------------------------------------------------------------ rarity
def rarity_columns(job: AugmentJob, data: ImageSet) -> pd.DataFrame | None:
    """Per row of ``data``: ``weight`` (sampling probability, sums to 1) and ``rarity`` (higher = rarer), from
    --weights (an audit's scores, joined on path) or --model (encode with the VAE and score rarity as `debias audit`
    does with its defaults); None when neither is given."""
    if job.weights is not None:
        scores = read_scores(job.weights)
    elif job.model is not None:
        scores = _vae_scores(job, data)
    else:
        return None
    scores = scores.drop_duplicates("path")
    scores.index = scores["path"].astype(str).to_numpy()
    keys = data.table["path"].astype(str)
    missing = ~keys.isin(scores.index)
    if missing.any():
        raise DebiasError(
            f"{int(missing.sum())} of {len(keys)} rows have no rarity score (first: {keys[missing].iloc[0]}); "
            "audit the same rows you augment"
        )
    out = scores.loc[keys.to_numpy(), [c for c in ("weight", "rarity") if c in scores.columns]].reset_index(drop=True)
    w = out["weight"].to_numpy(dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DebiasError("the rarity weights must be finite, non-negative and not all zero")
    out["weight"] = w / w.sum()
    return out


def _vae_scores(job: AugmentJob, data: ImageSet) -> pd.DataFrame:
    from debias.density.encoding import encode_images
    from debias.density.rarity import fit_audit_rarity
    from debias.pipelines.audit import run_embeddings
    from debias.training.vae import load_model

    assert job.model is not None
    model, _ = load_model(job.model, resolve_device(job.device))
    cfg = model.config
    # The VAE reads the rows at its own size and channels; same source and filters, so the same paths.
    vae_data = data
    if (cfg.image_size, cfg.channels) != (data.image_size, data.channels):
        vae_data = load_images(job.data, where=job.where, image_size=cfg.image_size, channels=cfg.channels, progress=job.progress)
    enc = encode_images(model, vae_data, progress=job.progress)
    embeddings = run_embeddings(job.model, vae_data, resolve_device(job.device))
    fit = fit_audit_rarity(enc.mu, enc.recon_error, embeddings=embeddings)  # as `debias audit` does by default
    return pd.DataFrame({"path": vae_data.table["path"].astype(str), "weight": fit.weights, "rarity": fit.rarity})


# --------------------------------------------------------------------------------------------------- GAN
def label_mix(labels: np.ndarray, n_classes: int, weights: np.ndarray | None, balanced: bool) -> np.ndarray:
    """Class probabilities for generation: uniform when ``balanced``; otherwise the label mix of what the generator
    was trained on, i.e. each class's share of the sampling weight (its share of the rows when unweighted), so the
    generated labels follow the rare region's label mix."""
    if balanced:
        return np.full(n_classes, 1.0 / n_classes)
    w = np.full(len(labels), 1.0 / len(labels)) if weights is None else weights
    mix = np.bincount(labels, weights=w, minlength=n_classes)
    return mix / mix.sum()


def _run_gan(job: AugmentJob, data: ImageSet) -> tuple[pd.DataFrame | None, int]:
    labels, classes = None, []
    if job.label is not None:
        missing = int(data.table[job.label].isna().sum())
        if missing:
            raise DebiasError(f"--label {job.label!r} is missing in {missing} rows; filter them out with --where")
        labels, classes = encode_labels(data.table[job.label])
        if len(classes) < 2:
            raise DebiasError(f"--label {job.label!r} has a single value ({classes[0]}); drop --label for one class")
    rarity = rarity_columns(job, data)
    weights = rarity["weight"].to_numpy() if rarity is not None else None
    try:
        model_config = DCGANConfig(
            image_size=job.image_size,
            channels=data.channels,
            z_dim=job.gan.z_dim,
            width=job.gan.width,
            n_classes=len(classes),
            classes=classes,
        )
    except ValueError as exc:
        raise DebiasError(str(exc)) from exc
    config = GANTrainConfig(
        epochs=job.epochs,
        batch_size=job.batch_size or 64,
        lr=job.lr,
        d_lr=job.gan.d_lr,
        ema_decay=job.gan.ema_decay,
        augment=DiffAugmentConfig() if job.gan.diffaugment else DiffAugmentConfig(color=False, translation=0.0, cutout=0.0),
        seed=job.seed,
        device=job.device,
        max_steps=job.max_steps,
        max_minutes=job.max_minutes,
    )
    desc = DataDescription(
        source=job.data, where=list(job.where), fingerprint=data.fingerprint, n_images=len(data),
        n_skipped=len(data.skipped), label=job.label,
    )
    path = train_gan(
        data, model_config, config, job.out, data_desc=desc, labels=labels, weights=weights, resume=job.resume,
        progress=job.progress,
    )
    if not _is_main(job):
        return None, len(data)

    generator, _ = load_generator(path, resolve_device(job.device))
    rng = np.random.default_rng([job.seed, 1])
    y = None
    if labels is not None:
        y = rng.choice(len(classes), size=job.n, p=label_mix(labels, len(classes), weights, job.gan.balanced_labels))
    noise = torch.Generator().manual_seed(job.seed + 2)
    names = _clear_images(job.out, "gan", job.n)
    device = next(generator.parameters()).device
    with progress_bar("generating", total=job.n, enabled=job.progress) as bar:
        for start in range(0, job.n, 256):
            stop = min(start + 256, job.n)
            yb = torch.from_numpy(y[start:stop]) if y is not None else None
            with autocast(device):
                images = to_uint8(generator.sample(stop - start, yb, generator=noise))
            _write_pngs(images, [job.out / p for p in names[start:stop]])
            bar.advance(stop - start)
    manifest = pd.DataFrame({"path": names})
    if y is not None:
        manifest[job.label] = [classes[k] for k in y]
    manifest["synthetic"] = True
    manifest["method"] = "gan"
    return manifest, len(data)


# ---------------------------------------------------------------------------------------------- CycleGAN
def pick_domains(job: AugmentJob, data: ImageSet) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows of domain A (translated) and B (translated into), and the name of the output's domain column."""
    cg = job.cyclegan
    if cg.domain_column is not None:
        col = cg.domain_column
        if col not in data.table.columns:
            raise DebiasError(f"--domain-column {col!r} is not a column of the data (columns: {', '.join(data.table.columns)})")
        values = data.table[col].astype(str)
        a, b = np.flatnonzero(values == cg.source), np.flatnonzero(values == cg.target)
        present = sorted(values.unique().tolist())
        for name, rows, value in (("--from", a, cg.source), ("--to", b, cg.target)):
            if len(rows) == 0:
                raise DebiasError(f"{name} {value!r}: no rows with {col}={value} (values: {', '.join(present[:20])})")
        return a, b, col
    scores = rarity_columns(job, data)
    assert scores is not None  # _validate asked for --weights or --model
    if "rarity" not in scores.columns:
        raise DebiasError(f"--weights: {job.weights} has no 'rarity' column to split common from rare")
    rarity = scores["rarity"].to_numpy(dtype=np.float64)
    threshold = np.quantile(rarity, 1.0 - cg.rare_quantile)
    rare = rarity >= threshold
    if rare.all() or not rare.any():
        raise DebiasError(f"--rare-quantile {cg.rare_quantile} leaves one domain empty")
    return np.flatnonzero(~rare), np.flatnonzero(rare), "domain"


def _run_cyclegan(job: AugmentJob, data: ImageSet) -> tuple[pd.DataFrame | None, int]:
    cg = job.cyclegan
    rows_a, rows_b, domain_col = pick_domains(job, data)
    if job.n > len(rows_a):
        raise DebiasError(
            f"--n {job.n} is more than the {len(rows_a)} images of domain {cg.source!r}: each is translated at most once"
        )
    domain_a, domain_b = data.subset(rows_a), data.subset(rows_b)
    try:
        model_config = CycleGANConfig(image_size=job.image_size, channels=data.channels, width=cg.width,
                                      disc_width=cg.width,
                                      n_blocks=cg.n_blocks if cg.n_blocks is not None else default_n_blocks(job.image_size))
    except ValueError as exc:
        raise DebiasError(str(exc)) from exc
    config = CycleGANTrainConfig(epochs=job.epochs, batch_size=job.batch_size or 8, lr=job.lr, seed=job.seed,
                                 device=job.device, max_steps=job.max_steps, max_minutes=job.max_minutes)
    fingerprint = hashlib.sha256(f"{domain_a.fingerprint}\0{domain_b.fingerprint}".encode()).hexdigest()[:16]
    desc = DataDescription(
        source=job.data, where=list(job.where), fingerprint=fingerprint, n_images=len(rows_a) + len(rows_b),
        n_skipped=len(data.skipped), label=job.label,
    )
    path = train_cyclegan(domain_a, domain_b, model_config, config, job.out, data_desc=desc, resume=job.resume,
                          progress=job.progress)
    if not _is_main(job):
        return None, len(rows_a) + len(rows_b)

    g_ab, _, _ = load_generators(path, resolve_device(job.device))
    device = next(g_ab.parameters()).device
    picked = np.sort(np.random.default_rng([job.seed, 2]).choice(len(rows_a), size=job.n, replace=False))
    names = _clear_images(job.out, "cyclegan", job.n)
    with progress_bar("translating", total=job.n, enabled=job.progress) as bar:
        for start in range(0, job.n, 64):
            idx = picked[start : start + 64]
            with torch.inference_mode(), autocast(device):
                images = to_uint8(g_ab(domain_a.batch(idx).to(device).mul_(2).sub_(1)))
            _write_pngs(images, [job.out / p for p in names[start : start + len(idx)]])
            bar.advance(len(idx))
    source_rows = domain_a.table.iloc[picked].reset_index(drop=True)
    manifest = pd.DataFrame({"path": names})
    if job.label is not None and job.label != domain_col:
        manifest[job.label] = source_rows[job.label].to_numpy()
    manifest[domain_col] = cg.target
    manifest["synthetic"] = True
    manifest["method"] = "cyclegan"
    manifest["source_path"] = source_rows["path"].astype(str).to_numpy()
    return manifest, len(rows_a) + len(rows_b)


# ------------------------------------------------------------------------------------------------ output
def _is_main(job: AugmentJob) -> bool:
    """Under torchrun every rank trains; only rank 0 generates and writes (the others would race on the files).
    The ranks leave the process group through run_augment's distributed_job scope."""
    return dist.init_distributed(job.device).is_main


def _clear_images(out: Path, method: str, n: int) -> list[str]:
    """Relative paths of the n images; older images of this method (a previous run with a larger --n) are removed."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{method}_*.png"):
        old.unlink()
    return [f"images/{method}_{i:06d}.png" for i in range(n)]


def _write_pngs(images: np.ndarray, paths: list[Path]) -> None:
    for img, p in zip(images, paths):
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(p)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_table(df, path)  # a reader never sees half a manifest


def merge_manifests(original: Path, synthetic: Path, where: list[str] | None = None) -> pd.DataFrame:
    """The original manifest's rows (synthetic False) and the synthetic ones, every path made absolute (each manifest's
    paths are relative to its own folder, so a concatenation needs absolute ones). Columns are the union.

    The synthetic rows were made from the rows ``where`` selected, so they take its single-valued filters
    (``split=train``): the same ``--where`` that picks the original training rows then picks them too."""
    fill = {col: values[0] for col, values in parse_where(where or []).items() if len(set(values)) == 1}
    frames = []
    for manifest, is_synthetic in ((original, False), (synthetic, True)):
        try:
            df = pd.read_parquet(manifest) if manifest.suffix.lower() in (".parquet", ".pq") else pd.read_csv(manifest)
        except Exception as exc:  # noqa: BLE001
            raise DebiasError(f"cannot read manifest {manifest}: {type(exc).__name__}") from None
        if "path" not in df.columns:
            raise DebiasError(f"manifest {manifest} has no 'path' column")
        root = manifest.resolve().parent
        df["path"] = [str(root / os.path.expanduser(str(p))) for p in df["path"]]
        if "synthetic" not in df.columns:
            df["synthetic"] = is_synthetic
        if is_synthetic:
            for col, value in fill.items():
                if col not in df.columns:
                    df[col] = value
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
