"""`debias score`: novelty, conformal p-value, is_novel, rarity and the unusual latent dimensions of every image.

Outputs in the score folder:
    scores.parquet, scores.csv  one row per image: all source columns + novelty, p_value, is_novel, rarity,
                                recon_error, novelty_rank, driver (the statistic behind the
                                score), statistics (JSON: standardised value of each), top_dims (JSON list of
                                {dim, distance_share, tail, value})
    summary.json                counts, fraction novel, the score distribution against the calibration set (drift),
                                the detector's card (model, fitted-on data, calibration size, threshold, target FPR)
    heatmaps/                   with --heatmaps K: reconstruction-error heatmaps of the K most novel images
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from debias.data import load_images
from debias.density.calibration import drift_report
from debias.density.detector import open_detector
from debias.density.encoding import encode_batch
from debias.density.heatmaps import heatmap_png
from debias.runtime.checkpoint import atomic_write_bytes, atomic_write_table, write_json
from debias.runtime.device import resolve_device


@dataclass
class ScoreJob:
    model: Path
    data: str
    out: Path
    where: list[str] = field(default_factory=list)
    fit_data: str | None = None  # default: the model's training data
    fit_where: list[str] = field(default_factory=list)
    refit: bool = False
    target_fpr: float | None = None  # default: the stored one (0.05 when fitted here)
    top_k: int = 5
    heatmaps: int = 0
    device: str = "auto"
    batch_size: int = 256
    progress: bool = True


@dataclass
class ScoreResult:
    scores: pd.DataFrame
    summary: dict[str, Any]
    out: Path


def run_score(job: ScoreJob) -> ScoreResult:
    device = resolve_device(job.device)
    det = open_detector(
        job.model, device=device, fit_data=job.fit_data, fit_where=job.fit_where, refit=job.refit,
        target_fpr=job.target_fpr, batch_size=job.batch_size, progress=job.progress,
    )
    data = load_images(job.data, where=job.where, image_size=det.image_size, channels=det.channels, progress=job.progress)
    t0 = time.perf_counter()
    res = det.score_dataset(data, top_k=job.top_k, batch_size=job.batch_size, progress=job.progress)
    seconds = time.perf_counter() - t0

    scores = data.table.copy()
    scores["novelty"] = res.novelty
    scores["p_value"] = res.p_value
    scores["is_novel"] = res.is_novel
    scores["rarity"] = res.rarity
    scores["recon_error"] = res.recon_error
    scores["novelty_rank"] = scores["novelty"].rank(ascending=False, method="first").astype(int)
    scores["driver"] = res.driver  # the statistic behind each verdict (NoveltyScorer's statistics)
    scores["statistics"] = [json.dumps(d) for d in res.statistics]
    scores["top_dims"] = [json.dumps(d) for d in res.top_dims]

    summary: dict[str, Any] = {
        "model": str(job.model),
        "source": job.data,
        "where": job.where,
        "fingerprint": data.fingerprint,
        "n_images": len(data),
        "n_skipped": len(data.skipped),
        "skipped": data.skipped.head(100).to_dict("records"),
        "n_novel": int(res.is_novel.sum()),
        "fraction_novel": float(res.is_novel.mean()),
        "against_calibration": drift_report(res.novelty, det.calibrator),
        "detector": det.card,
        "score_images_per_s": len(data) / seconds if seconds > 0 else None,
    }
    job.out.mkdir(parents=True, exist_ok=True)
    atomic_write_table(scores, job.out / "scores.parquet")
    atomic_write_table(scores, job.out / "scores.csv")
    if job.heatmaps > 0:
        summary["heatmaps"] = _write_heatmaps(det, data, scores, job.out / "heatmaps", job.heatmaps)
    write_json(summary, job.out / "summary.json")
    return ScoreResult(scores=scores, summary=summary, out=job.out)


def _write_heatmaps(det, data, scores: pd.DataFrame, folder: Path, k: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.argsort(-scores["novelty"].to_numpy(), kind="stable")[:k]
    _, recon = encode_batch(det.model, data.batch(rows))
    x = data.batch(rows)
    names = []
    for j, row in enumerate(rows):
        # The source's own image extension is dropped: "digit3.png" becomes 001_digit3.png, not 001_digit3.png.png.
        source = re.sub(r"\.(png|jpe?g|webp|bmp|gif|tiff?)$", "", str(scores["path"].iloc[row]), flags=re.IGNORECASE)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source)[-80:]
        name = f"{j + 1:03d}_{stem}.png"
        atomic_write_bytes(heatmap_png(x[j].numpy(), recon[j].numpy()), folder / name)
        names.append(name)
    return names
