"""`debias quality`: how good are the images `debias augment` generated, per group, against the real ones?

Inputs: the real images (a SOURCE and filters), the augment output folder (DIR/manifest.csv with ``path`` relative
to DIR, the label and group columns, ``method`` gan|cyclegan and, for CycleGAN rows, ``source_path``), and a VAE run
from ``debias train`` on the same real data, whose posterior means are the feature space (see
:mod:`debias.evaluation.generation_metrics` for why).

For every method in the manifest and every group present in both sets (plus "all"): FID, KID (mean ± std over
random subsets, subset size shrunk to fit small groups), improved precision and recall (k-NN manifolds). With
``label``: the classification accuracy score (a classifier trained on the generated images, tested on the real
ones), overall and per group.

Outputs in ``out``:
    quality.json   the settings, counts, skipped files, one metrics row per (method, group), CAS per method
    quality.html   self-contained page: summary, metrics table and chart, CAS, generated vs real images per group,
                   CycleGAN source -> translated pairs
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from debias.data import ImageDecodeError, ImageSet, decode_image, load_images
from debias.errors import DebiasError
from debias.evaluation.generation_metrics import (
    KID_DEFAULT_SUBSET_SIZE,
    KID_DEFAULT_SUBSETS,
    CasConfig,
    PrecomputedFeatures,
    as_dict,
    classification_accuracy_score,
    extract_features,
    fid_kid,
    finite_or_none,
    load_feature_extractor,
    precision_recall,
)
from debias.reports.quality import GroupImages, QualityPage, write_quality_html
from debias.runtime.checkpoint import write_json

MANIFEST = "manifest.csv"
ALL = "all"
FEATURE_NOTE = (
    "Features: the posterior mean of the VAE in --features (trained on the real data), not Inception-v3, so the "
    "values are comparable only between runs that use the same feature model. FID and KID: lower is closer to the "
    "real images (0 = same distribution). Precision: share of generated images inside the real images' k-NN "
    "manifold; recall: share of real images inside the generated images' manifold (both measured on a seeded draw "
    "of equally many real and generated images, as the k-NN radii depend on the set size)."
)


@dataclass
class QualityJob:
    real: str  # SOURCE of the real images
    synthetic: Path  # the `debias augment` output folder (manifest.csv + images/)
    features: Path  # a `debias train` run on the real data
    out: Path
    real_where: list[str] = field(default_factory=list)
    group_by: str | None = None  # column present in both sets
    label: str | None = None  # column present in both sets: turns on the classification accuracy score
    k: int = 3  # neighbours for precision / recall
    pr_equal_sizes: bool = True  # precision / recall on a seeded draw of equally many real and generated images
    kid_subset_size: int = KID_DEFAULT_SUBSET_SIZE  # upper bound; shrunk per group to the smaller set
    kid_subsets: int = KID_DEFAULT_SUBSETS
    cas: CasConfig = field(default_factory=CasConfig)
    grid_images: int = 16  # generated (and real) images shown per group
    max_pairs: int = 24  # CycleGAN source -> translated pairs shown
    device: str = "auto"
    seed: int = 0
    batch_size: int = 256
    progress: bool = True


def _synthetic_manifest(folder: Path) -> Path:
    if not folder.exists():
        raise DebiasError(f"--synthetic {folder}: no such folder")
    if not folder.is_dir():
        raise DebiasError(f"--synthetic {folder}: not a folder (expected the output folder of 'debias augment')")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DebiasError(f"--synthetic {folder}: no {MANIFEST} in it (expected the output folder of 'debias augment')")
    return manifest


def _require_column(data: ImageSet, column: str, option: str, what: str) -> None:
    if column not in data.table.columns:
        cols = ", ".join(c for c in data.table.columns if c != "path")
        raise DebiasError(f"{option} {column!r}: the {what} have no such column (columns: {cols})")


def _as_str(values: pd.Series) -> np.ndarray:
    return values.astype(str).to_numpy()


def _group_rows(values: np.ndarray | None, n: int, group: str) -> np.ndarray:
    if group == ALL or values is None:
        return np.arange(n)
    return np.flatnonzero(values == group)


def _sample(rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=min(k, len(rows)), replace=False)) if len(rows) else rows


def _source_image(source_path: str, folder: Path, real: ImageSet, real_rows: dict[str, int]) -> np.ndarray | None:
    """A CycleGAN row's source image: a row of the real set (matched on ``path``), else a file (absolute, or
    relative to the synthetic folder or to the real source's folder). None when it cannot be found or read."""
    if source_path in real_rows:
        return np.asarray(real.images[real_rows[source_path]])
    candidates = [Path(source_path)] if Path(source_path).is_absolute() else [folder / source_path]
    if real.root is not None and not Path(source_path).is_absolute():
        candidates.append(real.root / source_path)
    for p in candidates:
        if p.is_file():
            try:
                return decode_image(p, real.image_size, real.channels)
            except ImageDecodeError:
                return None
    return None


def _pairs(syn: ImageSet, folder: Path, real: ImageSet, job: QualityJob, rng: np.random.Generator):
    if "source_path" not in syn.table.columns:
        return None, [], ""
    sp = syn.table["source_path"]
    rows = np.flatnonzero(sp.notna().to_numpy() & (sp.astype(str).str.len() > 0).to_numpy())
    if not len(rows):
        return None, [], ""
    real_rows = {p: i for i, p in enumerate(real.table["path"].astype(str))}
    images, captions, missing = [], [], 0
    for r in _sample(rows, job.max_pairs, rng):
        src = _source_image(str(sp.iloc[r]), folder, real, real_rows)
        if src is None:
            missing += 1
            continue
        images.append(np.stack([src, np.asarray(syn.images[r])]))
        group = f" ({syn.table[job.group_by].iloc[r]})" if job.group_by else ""
        captions.append((f"source: {Path(str(sp.iloc[r])).name}", f"→ translated{group}"))
    note = f"{len(rows)} translated images; {min(job.max_pairs, len(rows))} drawn at random"
    if missing:
        note += f", {missing} of them without a readable source image"
    return (np.stack(images) if images else None), captions, note


def run_quality(job: QualityJob) -> dict[str, Any]:
    """Measure, write quality.json and quality.html into ``job.out``, and return what quality.json holds."""
    folder = Path(job.synthetic)
    manifest = _synthetic_manifest(folder)
    if job.k < 1:
        raise DebiasError(f"--k must be at least 1, got {job.k}")
    features = load_feature_extractor(job.features, job.device)
    cfg = features.model.config
    real = load_images(job.real, where=job.real_where, image_size=cfg.image_size, channels=cfg.channels,
                       progress=job.progress)
    syn = load_images(str(manifest), image_size=cfg.image_size, channels=cfg.channels, progress=job.progress)
    for column, option in ((job.group_by, "--group-by"), (job.label, "--label")):
        if column:
            _require_column(real, column, option, "real images")
            _require_column(syn, column, option, f"generated images in {manifest}")

    real_groups = _as_str(real.table[job.group_by]) if job.group_by else None
    syn_groups = _as_str(syn.table[job.group_by]) if job.group_by else None
    methods = _as_str(syn.table["method"]) if "method" in syn.table.columns else np.full(len(syn), "synthetic")

    real_f = extract_features(real, features, batch_size=job.batch_size, progress=job.progress,
                              description="features (real)")
    syn_f = extract_features(syn, features, batch_size=job.batch_size, progress=job.progress,
                             description="features (generated)")
    identity = PrecomputedFeatures(real_f.shape[1])

    rows: list[dict[str, Any]] = []
    cas: dict[str, dict[str, Any]] = {}
    grids: list[GroupImages] = []
    rng = np.random.default_rng(job.seed)
    unmatched: dict[str, list[str]] = {}
    for method in sorted(set(methods.tolist())):
        m_rows = np.flatnonzero(methods == method)
        groups = [ALL]
        if job.group_by:
            real_values, syn_values = set(real_groups.tolist()), set(syn_groups[m_rows].tolist())
            groups += sorted(real_values & syn_values)
            if real_values - syn_values:
                unmatched[f"{method}: groups without generated images"] = sorted(real_values - syn_values)
            if syn_values - real_values:
                unmatched[f"{method}: generated groups without real images"] = sorted(syn_values - real_values)
        for group in groups:
            r_idx = _group_rows(real_groups, len(real), group)
            f_idx = m_rows[_group_rows(None if syn_groups is None else syn_groups[m_rows], len(m_rows), group)]
            fk = fid_kid(real_f[r_idx], syn_f[f_idx], identity, job.kid_subset_size, subsets=job.kid_subsets,
                         seed=job.seed)
            # Precision/recall on equal numbers of real and generated images, as Kynkäänniemi et al. measure them:
            # the k-NN radii shrink as a set grows, so unequal sizes would tilt both values (a small generated set
            # gets wide balls and an inflated recall).
            pr_real, pr_fake = r_idx, f_idx
            if job.pr_equal_sizes:
                n_pr = min(len(r_idx), len(f_idx))
                pr_rng = np.random.default_rng(job.seed)
                pr_real, pr_fake = _sample(r_idx, n_pr, pr_rng), _sample(f_idx, n_pr, pr_rng)
            pr = precision_recall(real_f[pr_real], syn_f[pr_fake], k=job.k)
            note = "; ".join(x for x in (fk.reason, pr.reason) if x)
            if fk.fid is not None and min(len(r_idx), len(f_idx)) <= real_f.shape[1]:
                note = "; ".join(x for x in (note, f"fewer images than feature dimensions ({real_f.shape[1]}): "
                                                   "FID covariance is rank-deficient, compare with care") if x)
            rows.append({
                "method": method, "group": group, "n_real": len(r_idx), "n_fake": len(f_idx),
                "fid": finite_or_none(fk.fid), "kid_mean": finite_or_none(fk.kid_mean),
                "kid_std": finite_or_none(fk.kid_std), "kid_subset_size": fk.kid_subset_size,
                "precision": pr.precision, "recall": pr.recall, "pr_n": min(len(pr_real), len(pr_fake)),
                "note": note or None,
            })
            if group != ALL or not job.group_by:
                grids.append(GroupImages(
                    method=method, group=group,
                    generated=np.asarray(syn.images[_sample(f_idx, job.grid_images, rng)]),
                    real=np.asarray(real.images[_sample(r_idx, job.grid_images, rng)]),
                ))
        if job.label:
            cas_config = replace(job.cas, device=job.device) if job.cas.device == "auto" else job.cas
            res = classification_accuracy_score(
                syn.subset(m_rows), _as_str(syn.table[job.label].iloc[m_rows]), real, _as_str(real.table[job.label]),
                groups=real_groups, config=cas_config, progress=job.progress,
            )
            cas[method] = dict(as_dict(res))

    pairs, pair_captions, pairs_note = _pairs(syn, folder, real, job, rng)
    summary: dict[str, Any] = {
        "real": job.real,
        "real_where": job.real_where,
        "synthetic": str(folder),
        "features": str(job.features),
        "feature_space": f"VAE posterior mean, {real_f.shape[1]} dimensions",
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "n_real": len(real),
        "n_synthetic": len(syn),
        "skipped_real": len(real.skipped),
        "skipped_synthetic": len(syn.skipped),
        "methods": sorted(set(methods.tolist())),
        "group_by": job.group_by,
        "label": job.label,
        "k": job.k,
        "precision_recall_equal_sizes": job.pr_equal_sizes,
        "kid_subsets": job.kid_subsets,
        "kid_max_subset_size": job.kid_subset_size,
        **unmatched,
    }
    result = {
        "summary": summary,
        "skipped": {
            "real": real.skipped.astype(str).to_dict("records"),
            "synthetic": syn.skipped.astype(str).to_dict("records"),
        },
        "metrics": rows,
        "cas": cas,
        "cas_config": asdict(job.cas) if job.label else None,
    }
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "quality.json")
    page_summary = {k: v for k, v in summary.items() if v not in (None, [], "")}
    for method, res in cas.items():
        page_summary[f"CAS accuracy ({method})"] = res["accuracy"]
    write_quality_html(
        QualityPage(
            title=f"Quality of generated images: {folder.name}", summary=page_summary, metrics=rows, cas=cas,
            grids=grids, pairs=pairs, pair_captions=pair_captions, pairs_note=pairs_note, feature_note=FEATURE_NOTE,
        ),
        out / "quality.html",
    )
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    """The metrics rows as plain text for the terminal."""
    def f(v: Any, spec: str = ".4g") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [f"{'method':<10} {'group':<22} {'real':>6} {'gen':>6} {'FID':>10} {'KID':>10} {'prec':>6} {'recall':>6}"]
    for r in rows:
        lines.append(
            f"{str(r['method'])[:10]:<10} {str(r['group'])[:22]:<22} {r['n_real']:>6} {r['n_fake']:>6} "
            f"{f(r['fid']):>10} {f(r['kid_mean']):>10} {f(r['precision'], '.3f'):>6} {f(r['recall'], '.3f'):>6}"
        )
    return "\n".join(lines)
