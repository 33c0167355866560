"""The density settings compared side by side by the audit benchmarks, and how each is scored against ground truth."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from debias.density.estimators import LatentHistogramDensity

SETTINGS: dict[str, dict] = {
    "max (lab), bins 10, alpha 1e-3": dict(combine="max", bins=10, alpha=0.001, whiten=False),
    "product, T=1 (paper, untempered)": dict(temperature=1.0, whiten=False),
    "product, T=0.1": dict(temperature=0.1, whiten=False),
    "product, auto T (ESS 0.5)": dict(whiten=False),
    "product, auto T (ESS 0.5), active dims": dict(whiten=False, dims="active"),
    "product, auto T (ESS 0.3)": dict(whiten=False, target_ess=0.3),
    "whitened product, auto T (ESS 0.5) [default]": dict(),
    "whitened product, auto T (ESS 0.5), leading PCs": dict(dims="active"),
    "whitened product, auto T (ESS 0.3)": dict(target_ess=0.3),
    "whitened product, auto T (ESS 0.2)": dict(target_ess=0.2),
    "whitened product, auto T (ESS 0.5), bins 5": dict(bins=5),
    "whitened product, auto T (ESS 0.5), bins 20": dict(bins=20),
    "whitened product, auto T (ESS 0.5), alpha 0.01": dict(alpha=0.01),
    "whitened max, bins 10, alpha 1e-3": dict(combine="max"),
}


def score_settings(Z: np.ndarray, rare: np.ndarray, reference: np.ndarray, settings: dict[str, dict] = SETTINGS) -> list[dict]:
    """For each setting: mean weight of the ``rare`` rows / mean weight of the ``reference`` rows, the AUROC of
    rarity for ``rare`` membership, and the effective sample size of the weights."""
    rows = []
    for name, params in settings.items():
        d = LatentHistogramDensity(**params).fit(Z)
        w = d.sampling_weights(Z)
        rows.append(
            {
                "setting": name,
                "weight_ratio": float(w[rare].mean() / w[reference].mean()),
                "auroc": float(roc_auc_score(rare, -d.score_samples(Z))),
                "ess": float(d.ess_),
                "ess_fraction": float(d.ess_ / len(w)),
                "temperature": float(d.temperature_),
            }
        )
    return rows
