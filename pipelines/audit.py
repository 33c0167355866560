"""`debias audit`: score every sample of a source for rarity with a trained model, and write the tables and report.

Outputs in the audit folder:
    scores.parquet, scores.csv  one row per sample: all source columns + rarity, weight, recon_error, rarity_rank
    summary.json                counts, skipped files, effective sample size, density settings, per-group statistics
    report.html                 self-contained report (see debias.report)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from debias.checkpoint import atomic_write_table, write_json
from debias.data import load_images
from debias.density import LatentHistogramDensity
from debias.device import resolve_device
from debias.errors import DebiasError
from debias.models import ConvVAE
from debias.report import AuditReport, write_report
from debias.scoring import Encoded, encode_images, group_stats, kl_per_dim, rarity_table
from debias.training import load_model
from pipelines.audit_browser import write_browser_assets


@dataclass
class DensityOptions:
    """The LatentHistogramDensity parameters an audit exposes (defaults = the estimator's)."""

    bins: int = 10
    alpha: float = 0.001
    combine: str = "product"
    temperature: float | str = "auto"
    target_ess: float = 0.5
    dims: str = "all"
    whiten: bool = True

    def check(self) -> None:
        """One-line errors for the options the estimator would reject with a traceback."""
        if self.combine not in ("product", "max"):
            raise DebiasError(f"--combine must be product or max, got {self.combine!r}")
        if self.dims not in ("all", "active"):
            raise DebiasError(f"--dims must be all or active, got {self.dims!r}")

    def build(self) -> LatentHistogramDensity:
        return LatentHistogramDensity(**asdict(self))


@dataclass
class AuditJob:
    model: Path
    data: str
    out: Path
    where: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    density: DensityOptions = field(default_factory=DensityOptions)
    device: str = "auto"
    batch_size: int = 256
    report: bool = True
    progress: bool = True


@dataclass
class AuditResult:
    scores: pd.DataFrame
    summary: dict[str, Any]
    out: Path


@dataclass
class EncodedRows:
    """What an engine hands the shared density/outputs stage: the kept rows, their encodings, and a way back to the
    pixels of a few rows for the report. The local engine reads them from its decode cache; the Ray engine
    (pipelines/ray_audit.py) decodes and encodes on a cluster and decodes the report's few rows again on the driver."""

    table: pd.DataFrame  # one row per encoded image (RangeIndex): the source's columns
    skipped: pd.DataFrame  # path, reason of the rows that could not be read
    fingerprint: str
    enc: Encoded  # row i of every array belongs to table row i
    encode_s: float
    pixels: Callable[[np.ndarray], np.ndarray]  # row positions -> (k, H, W, C) uint8
    engine: dict[str, Any] = field(default_factory=lambda: {"name": "local"})


def check_group_by(job: AuditJob, columns: pd.Index) -> None:
    missing = [c for c in job.group_by if c not in columns]
    if missing:
        raise DebiasError(f"--group-by column(s) {missing} not in the data (columns: {', '.join(columns)})")


def run_audit(job: AuditJob) -> AuditResult:
    device = resolve_device(job.device)
    model, meta = load_model(job.model, device)
    cfg = model.config
    data = load_images(
        job.data, where=job.where, image_size=cfg.image_size, channels=cfg.channels, progress=job.progress
    )
    check_group_by(job, data.table.columns)

    t0 = time.perf_counter()
    enc = encode_images(model, data, batch_size=job.batch_size, progress=job.progress)
    rows = EncodedRows(
        table=data.table, skipped=data.skipped, fingerprint=data.fingerprint, enc=enc,
        encode_s=time.perf_counter() - t0, pixels=lambda idx: np.asarray(data.images[idx]),
    )
    return write_audit(job, model, meta, rows)


def write_audit(job: AuditJob, model: ConvVAE, meta: dict[str, Any], rows: EncodedRows) -> AuditResult:
    """The part every engine shares: fit the density on the latents, score, and write the tables, summary, report."""
    cfg = model.config
    enc, n = rows.enc, len(rows.table)
    density = job.density.build().fit(enc.mu)
    scores = rarity_table(rows.table, enc, density)
    if enc.logits is not None:
        probs = torch.softmax(torch.from_numpy(enc.logits), 1).numpy()
        scores["predicted_label"] = [cfg.classes[i] for i in probs.argmax(1)]
        scores["predicted_probability"] = probs.max(1)

    groups = {col: group_stats(scores, [col]) for col in job.group_by}
    if len(job.group_by) > 1:
        groups[" x ".join(job.group_by)] = group_stats(scores, job.group_by)

    kl = kl_per_dim(enc)
    summary: dict[str, Any] = {
        "model": str(job.model),
        "model_trained_on": meta["data"],
        "source": job.data,
        "where": job.where,
        "fingerprint": rows.fingerprint,
        "n_images": n,
        "n_skipped": len(rows.skipped),
        "skipped": rows.skipped.head(100).to_dict("records"),
        "effective_sample_size": density.ess_,
        "effective_sample_fraction": density.ess_ / n,
        "density": {**asdict(job.density), "temperature_used": density.temperature_, "dims_used": density.dims_.tolist()},
        "active_dims_kl_gt_0.01": int((kl > 0.01).sum()),
        "encode_images_per_s": n / rows.encode_s,
        "engine": rows.engine,
        "groups": {name: _records(tbl) for name, tbl in groups.items()},
    }

    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(scores, job.out / "scores.parquet")
    atomic_write_table(scores, job.out / "scores.csv")
    write_json(summary, job.out / "summary.json")
    write_browser_assets(job.out, rows.pixels, scores, density)  # thumbnails + histograms for the /audit page
    if job.report:
        write_report(_report(model, rows.pixels, enc, density, scores, groups, summary, kl), job.out / "report.html")
    return AuditResult(scores=scores, summary=summary, out=job.out)


def _records(tbl: pd.DataFrame) -> dict[str, dict[str, float]]:
    return {str(k): {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for k, row in tbl.iterrows()}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., C, H, W) floats in [0, 1] -> (..., H, W, C) uint8."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(arr, -3, -1)


def _report(
    model: ConvVAE,
    pixels: Callable[[np.ndarray], np.ndarray],
    enc: Encoded,
    density: LatentHistogramDensity,
    scores: pd.DataFrame,
    groups: dict[str, pd.DataFrame],
    summary: dict[str, Any],
    kl: np.ndarray,
    k: int = 16,
) -> AuditReport:
    device = next(model.parameters()).device
    order = np.argsort(-scores["rarity"].to_numpy())
    rarest, typical = order[:k], order[::-1][:k]

    def captions(rows: np.ndarray) -> list[str]:
        return [f"#{scores['rarity_rank'][i]} rarity {scores['rarity'][i]:.1f}" for i in rows]

    recon_rows = np.concatenate([rarest[:4], typical[:4]])
    x = torch.from_numpy(pixels(recon_rows)).permute(0, 3, 1, 2).float().div_(255.0).to(device)  # as ImageSet.batch
    with torch.inference_mode():
        recon = torch.sigmoid(model.decode(model.encode(x)[0]).float())

    # Traverse the dimensions the model uses most (highest KL), from the most typical sample's latent.
    top = np.argsort(-kl)[: min(8, len(kl))].tolist()
    values = np.linspace(-3, 3, 9).tolist()
    trav = model.traverse(torch.from_numpy(enc.mu[typical[0]]).float(), top, values)

    hists = [(density.counts_[j], density.edges_[j]) for j in range(len(density.edges_))]
    if density.whiten:
        labels = [f"pc{j}" for j in range(len(density.edges_))]
    else:
        labels = [f"z{d} (KL {kl[d]:.2f})" for d in density.dims_]
    aurocs = {
        f"{name} = {g}": float(row["rarity_auroc"])
        for name, tbl in groups.items()
        for g, row in tbl.iterrows()
        if not pd.isna(row["rarity_auroc"])
    }
    return AuditReport(
        title=f"debias audit: {summary['source']}",
        summary={k: v for k, v in summary.items() if k not in ("skipped", "groups")},
        scores=scores,
        latent_hist=hists,
        dim_labels=labels,
        rarest=pixels(rarest),
        rarest_captions=captions(rarest),
        typical=pixels(typical),
        typical_captions=captions(typical),
        recon_originals=_to_uint8(x),
        recon_outputs=_to_uint8(recon),
        traversals=_to_uint8(trav),
        traversal_labels=[f"z{d}" for d in top],
        traversal_values=values,
        prior_samples=_to_uint8(model.sample_prior(k)),
        group_tables=groups,
        rarity_auroc=aurocs,
    )
