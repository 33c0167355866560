"""Seeded, per-class splits of a labelled table's rows (the validation rows every classifier run holds out)."""

from __future__ import annotations

import numpy as np


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
