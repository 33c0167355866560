"""`debias audit`: score every sample of a source for rarity with a trained model, and write the tables and report.

Outputs in the audit folder:
    scores.parquet, scores.csv  one row per sample: all source columns + rarity, weight, recon_error, rarity_rank
    summary.json                counts, skipped files, effective sample size, density settings, per-group statistics
    report.html                 self-contained report (see debias.reports.audit)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from debias.api import load_encoder
from debias.data import ImageSet, load_images
from debias.data.imageset import list_rows
from debias.density.detector import embed_images
from debias.density.encoding import (
    Encoded,
    encode_images,
    group_stats,
    kl_per_dim,
    rarity_table,
)
from debias.density.estimators import LatentHistogramDensity, effective_sample_size
from debias.density.rarity import (
    AUDIT_EMBEDDING_READOUT,
    DEFAULT_ESTIMATOR,
    RARITY_ESTIMATORS,
    DensityOptions,
    fit_audit_rarity,
    tempered_weights,
)
from debias.errors import DebiasError
from debias.models import ConvVAE
from debias.pipelines.audit_browser import write_browser_assets
from debias.reports.audit import (
    AuditReport,
    GroupFinding,
    RowsFinding,
    Thumb,
    png_data_uri,
    write_report,
)
from debias.runtime.checkpoint import atomic_write_table, write_json
from debias.runtime.device import resolve_device
from debias.training.contrastive import encoder_path
from debias.training.vae import load_model


@dataclass
class AuditJob:
    model: Path
    data: str
    out: Path
    where: list[str] = field(default_factory=list)
    group_by: list[str] = field(default_factory=list)
    estimator: str = DEFAULT_ESTIMATOR  # debias.density.rarity.RARITY_ESTIMATORS
    n_neighbors: int = 5  # knn, knn-recon
    # knn-recon: add the kNN rarity of the run's contrastive encoder features when the run has one (issue 15)
    use_encoder: bool = True
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
    embeddings: np.ndarray | None = None  # the run's contrastive encoder features of the rows (None: not used)


def check_group_by(job: AuditJob, columns: pd.Index) -> None:
    if job.estimator not in RARITY_ESTIMATORS:
        raise DebiasError(f"--estimator must be one of {', '.join(RARITY_ESTIMATORS)}, got {job.estimator!r}")
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
    encode_s = time.perf_counter() - t0
    rows = EncodedRows(
        table=data.table, skipped=data.skipped, fingerprint=data.fingerprint, enc=enc, encode_s=encode_s,
        pixels=lambda idx: np.asarray(data.images[idx]),
        embeddings=run_embeddings(job.model, data, device, job.batch_size)
        if job.use_encoder and job.estimator == "knn-recon" else None,
    )
    return write_audit(job, model, meta, rows)


def run_embeddings(run: Path, data: ImageSet, device: torch.device, batch_size: int = 256) -> np.ndarray | None:
    """The rows' features from the run's contrastive encoder (`debias train` trains one unless --contrastive-epochs
    0), None when the run has none: the third term of the audit's ``knn-recon`` rarity, and of `debias augment
    --model`'s weights (the audit's)."""
    encoder = load_encoder(run, device)
    return None if encoder is None else embed_images(encoder, data, batch_size, AUDIT_EMBEDDING_READOUT)


def read_embeddings(path: Path) -> pd.DataFrame:
    """A Parquet (or CSV) file of precomputed embeddings keyed by ``path``: either one column ``embedding`` holding a
    vector per row, or numeric columns (every column but ``path``). Returns ``path`` + one float vector per row."""
    if not path.is_file():
        raise DebiasError(f"--embeddings {path}: no such file")
    try:
        table = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader error is the user's file: one line, no traceback
        raise DebiasError(f"--embeddings {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if "path" not in table.columns:
        raise DebiasError(f"--embeddings {path}: needs a 'path' column (columns: {', '.join(map(str, table.columns))})")
    if "embedding" in table.columns:
        vectors = [np.asarray(v, dtype=np.float64).ravel() for v in table["embedding"]]
    else:
        numeric = table.drop(columns=["path"]).select_dtypes("number")
        if numeric.shape[1] == 0:
            raise DebiasError(f"--embeddings {path}: no 'embedding' column and no numeric columns besides 'path'")
        vectors = list(numeric.to_numpy(dtype=np.float64))
    if len({len(v) for v in vectors}) > 1:
        raise DebiasError(f"--embeddings {path}: the rows have vectors of different lengths")
    if table["path"].duplicated().any():
        raise DebiasError(f"--embeddings {path}: {int(table['path'].duplicated().sum())} duplicated paths")
    return pd.DataFrame({"path": table["path"].astype(str), "vector": vectors})


def run_embeddings_audit(job: AuditJob, embeddings: Path) -> AuditResult:
    """`debias audit --embeddings FILE`: rarity over precomputed embeddings (CLIP and similar) instead of a model's
    latents. Rows are the source's (after --where) that have an embedding, matched on ``path``; the others are
    counted and left out. There is no reconstruction error, so ``knn-recon`` (the default) means ``knn`` here; the
    HTML report, which shows the model's reconstructions and traversals, is not written."""
    estimator = "knn" if job.estimator == "knn-recon" else job.estimator
    if estimator == "recon":
        raise DebiasError("--estimator recon needs a model's reconstruction error; embeddings have none")
    listed = list_rows(job.data, where=job.where)
    table = listed.table.reset_index(drop=True)
    check_group_by(job, table.columns)
    emb = read_embeddings(embeddings)
    table = table.assign(path=table["path"].astype(str))
    merged = table.merge(emb, on="path", how="left", validate="one_to_one")
    has = merged["vector"].notna().to_numpy()
    if has.sum() < 3:
        raise DebiasError(
            f"--embeddings {embeddings}: {int(has.sum())} of the {len(table)} rows of the data have an embedding "
            "(matched on 'path', as the source lists it); need at least 3"
        )
    kept = merged[has].reset_index(drop=True)
    X = np.stack(kept.pop("vector").to_numpy())
    if not np.isfinite(X).all():
        raise DebiasError(f"--embeddings {embeddings}: NaN or infinite values")
    fit = fit_audit_rarity(X, np.zeros(len(X)), estimator, job.density, job.n_neighbors)
    scores = kept.assign(rarity=fit.rarity, weight=fit.weights)
    scores["rarity_rank"] = scores["rarity"].rank(ascending=False, method="first").astype(int)
    groups = group_tables(scores, job.group_by)
    summary: dict[str, Any] = {
        "embeddings": str(embeddings),
        "embedding_dim": int(X.shape[1]),
        "source": job.data,
        "where": job.where,
        "n_rows": int(len(table)),
        "n_without_embedding": int((~has).sum()),
        "n_scored": int(len(scores)),
        "rarity_estimator": estimator,
        "effective_sample_size": effective_sample_size(fit.weights),
        "effective_sample_fraction": effective_sample_size(fit.weights) / len(scores),
        "density": {**asdict(job.density), "n_neighbors": job.n_neighbors, "temperature_used": fit.temperature},
        "groups": {name: _records(tbl) for name, tbl in groups.items()},
    }
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(scores, job.out / "scores.parquet")
    atomic_write_table(scores, job.out / "scores.csv")
    write_json(summary, job.out / "summary.json")
    return AuditResult(scores=scores, summary=summary, out=job.out)


def write_audit(job: AuditJob, model: ConvVAE, meta: dict[str, Any], rows: EncodedRows) -> AuditResult:
    """The part every engine shares: fit the density on the latents, score, and write the tables, summary, report."""
    cfg = model.config
    enc, n = rows.enc, len(rows.table)
    fit = fit_audit_rarity(enc.mu, enc.recon_error, job.estimator, job.density, job.n_neighbors,
                           embeddings=rows.embeddings)
    density = fit.histogram
    scores = rarity_table(rows.table, enc, fit.rarity, fit.weights)
    for term, values in (fit.components or {}).items():  # which term makes each row rare
        scores[f"rarity_{term}"] = values
    if enc.logits is not None:
        probs = torch.softmax(torch.from_numpy(enc.logits), 1).numpy()
        scores["predicted_label"] = [cfg.classes[i] for i in probs.argmax(1)]
        scores["predicted_probability"] = probs.max(1)

    groups = group_tables(scores, job.group_by)

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
        "rarity_estimator": job.estimator,
        # knn-recon's third term: the run's contrastive encoder (None: not used, or the run has none)
        "contrastive_encoder": None if rows.embeddings is None else {
            "path": str(encoder_path(job.model)), "n_neighbors": fit.fitted.embedding_neighbors,
            "readout": AUDIT_EMBEDDING_READOUT},
        "effective_sample_size": effective_sample_size(fit.weights),
        "effective_sample_fraction": effective_sample_size(fit.weights) / n,
        # What the data says before any tempering: the ESS of the paper's untempered inverse-density weights (the
        # histogram product, Eq. 3-4 at T = 1). Low = a few rows are far rarer than the rest.
        "untempered_effective_sample_fraction": _untempered_ess(density, enc.mu) / n,
        "density": {**asdict(job.density), "n_neighbors": job.n_neighbors, "temperature_used": fit.temperature,
                    "histogram_dims_used": density.dims_.tolist()},
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


def group_tables(scores: pd.DataFrame, group_by: list[str]) -> dict[str, pd.DataFrame]:
    """Per-group statistics for each --group-by column, and for their cross product ("a x b") when several."""
    groups = {col: group_stats(scores, [col]) for col in group_by}
    if len(group_by) > 1:
        groups[" x ".join(group_by)] = group_stats(scores, group_by)
    return groups


def group_table(name: str, groups: dict[str, dict[str, float]], highlight: str | None = None) -> Any:
    """The per-group table printed by `debias audit --group-by` and the demo (a rich Table), sorted by weight ratio:
    rows, share of the rows, share of the weight, the ratio of the two (the group's mean weight relative to the
    average row: 1.0 = drawn as often as uniform sampling would) and the AUROC of rarity for the group."""
    from rich.table import Table

    table = Table(
        title=f"Groups by {name}", caption="ratio = share of weight ÷ share of rows (1.0 = drawn as often as "
        "uniform sampling would); AUROC = how well rarity ranks the group's rows first",
    )
    for col in ("group", "rows", "% rows", "% weight", "ratio", "AUROC"):
        table.add_column(col, justify="left" if col == "group" else "right", no_wrap=True)
    for group, g in sorted(groups.items(), key=lambda kv: -(kv[1]["weight_ratio"] or 0.0)):
        auroc = g.get("rarity_auroc")
        table.add_row(
            group, f"{g['count']:.0f}", f"{g['share']:.1%}", f"{g['weight_share']:.1%}", f"{g['weight_ratio']:.2f}",
            "–" if auroc is None else f"{auroc:.3f}", style="bold red" if group == highlight else None,
        )
    return table


def _untempered_ess(histogram: LatentHistogramDensity, mu: np.ndarray) -> float:
    return effective_sample_size(tempered_weights(-histogram.score_samples(mu), 1.0))


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

    tag_cols = [c for c in groups if c in scores.columns] or [c for c in ("label",) if c in scores.columns]

    def tag(i: int) -> str:  # the row's group or label, and its path
        values = " x ".join(str(scores[c].iloc[i]) for c in tag_cols)
        return f"{values} · {scores['path'].iloc[i]}" if values else str(scores["path"].iloc[i])

    def captions(rows: np.ndarray) -> list[str]:
        return [f"#{scores['rarity_rank'][i]} rarity {scores['rarity'][i]:.1f} · {tag(i)}" for i in rows]

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
    def thumbs(rows: np.ndarray) -> list[Thumb]:
        imgs = pixels(rows)
        return [Thumb(png_data_uri(imgs[j]), tag(i)) for j, i in enumerate(rows)]

    finding_groups = []
    for name, tbl in groups.items():
        even = 1.0 / len(tbl)
        key = scores[name.split(" x ")].astype(str).agg(" x ".join, axis=1).to_numpy()
        for g, row in tbl[tbl["share"] < 0.5 * even].sort_values("share").head(5).iterrows():
            members = np.flatnonzero(key == str(g))
            rarest_members = members[np.argsort(-scores["rarity"].to_numpy()[members])][:8]
            finding_groups.append(GroupFinding(
                grouping=name, group=str(g), count=int(row["count"]), share=float(row["share"]), even_share=even,
                weight_share=float(row["weight_share"]), ratio=float(row["weight_ratio"]),
                auroc=None if pd.isna(row["rarity_auroc"]) else float(row["rarity_auroc"]),
                examples=thumbs(rarest_members),
            ))

    # The latent factor that sets the rarest rows apart: the dimension where their posterior means lie furthest
    # from the data's median, in robust standard deviations; shown as a traversal of that one dimension.
    mu = enc.mu
    med = np.median(mu, 0)
    mad = 1.4826 * np.median(np.abs(mu - med), 0)
    shift = np.abs(mu[rarest] - med) / np.where(mad > 0, mad, 1.0)
    dim = int(np.argmax(shift.mean(0)))
    step = float(mad[dim]) if mad[dim] > 0 else 1.0
    dim_values = [float(med[dim] + k * step) for k in (-4, -3, -2, -1, 0, 1, 2, 3, 4)]
    base = torch.from_numpy(enc.mu[typical[0]]).float()
    with torch.inference_mode():
        z = base.repeat(len(dim_values), 1)
        z[:, dim] = torch.tensor(dim_values)
        dim_trav = _to_uint8(torch.sigmoid(model.decode(z.to(device)).float()))
    by_recon = by_embedding = None
    terms = [t for t in ("latent", "reconstruction", "embedding") if f"rarity_{t}" in scores.columns]
    if "reconstruction" in terms:  # the term with the largest standardised value makes the row rare
        main = np.array(terms)[np.argmax(scores[[f"rarity_{t}" for t in terms]].to_numpy()[rarest], axis=1)]
        by_recon = int((main == "reconstruction").sum())
        by_embedding = int((main == "embedding").sum()) if "embedding" in terms else None
    finding_rows = RowsFinding(
        estimator=str(summary.get("rarity_estimator", "")), n_rows=len(scores), n_shown=len(rarest),
        examples=thumbs(rarest), by_reconstruction=by_recon, by_embedding=by_embedding, dim_label=f"z{dim}", dim_shift=float(shift.mean(0)[dim]),
        traversal=[png_data_uri(im, scale=1) for im in dim_trav],
        traversal_values=[f"{v:+.2f}" for v in dim_values],
    )

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
        finding_groups=finding_groups,
        finding_rows=finding_rows,
    )
