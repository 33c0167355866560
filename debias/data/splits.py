"""Seeded, per-class splits of a labelled table's rows (the validation rows every classifier run holds out)."""

from __future__ import annotations

import numpy as np

# Share of a model's training images held out for the novelty detector's conformal calibration: `debias train`
# keeps them out of training and the detector calibrates on exactly them (issue 16: a model reconstructs its own
# training images better than new ones, so calibrating on seen images lets the realised false-positive rate creep
# above the target).
DEFAULT_CALIBRATION_FRACTION = 0.2


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (fit, validation): a seeded ``fraction`` of every label class, at least one row left to fit."""
    if fraction <= 0:
        return np.arange(len(y)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5A1])
    val = []
    for k in np.unique(y):
        rows = np.flatnonzero(y == k)
        take = min(int(round(len(rows) * fraction)), len(rows) - 1)
        val.append(rng.permutation(rows)[:take])
    v = np.sort(np.concatenate(val)).astype(np.int64)
    return np.setdiff1d(np.arange(len(y)), v), v


def calibration_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (fit, calibration): a seeded random ``fraction`` of ``n`` rows for the conformal calibration.

    `debias train --calibration-fraction` holds these rows out of the model's training, and the novelty detector
    fitted on the model's training data calibrates on exactly these rows (the same n, fraction and seed give the same
    rows): calibration images the model never saw are exchangeable with new in-distribution images, which is what
    the conformal p-values need. Raises ValueError when either part would be too small."""
    n_cal = int(round(n * fraction))
    if not 0 < fraction < 1 or n_cal < 1 or n - n_cal < 2:
        raise ValueError(f"cannot split {n} images into a fit part and a calibration part of {fraction:.0%}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_cal:]), np.sort(order[:n_cal])
