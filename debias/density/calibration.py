"""Conformal p-values for novelty scores, the decision threshold for a target false-positive rate, and drift.

Split-conformal calibration (Vovk et al. 2005; Bates et al., "Testing for outliers with conformal p-values", Ann.
Stat. 2023): with novelty scores c_1..c_n of held-out in-distribution images, an image with score s gets

    p(s) = (1 + #{j : c_j >= s}) / (n + 1).

If the image and the calibration images are exchangeable (drawn from the same distribution and scored by a function
fitted without them), P(p <= a) <= a for every a, so flagging ``p <= target_fpr`` wrongly flags at most that
fraction of in-distribution images. The p-value of a score depends only on the stored calibration scores, never on
other images being scored at the same time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator


class ConformalCalibrator(BaseEstimator):
    """Conformal p-values and the novelty threshold for a target false-positive rate, scikit-learn style.

    Parameters
    ----------
    target_fpr : the fraction of in-distribution images that may be flagged novel; ``is_novel = p <= target_fpr``.

    Fitted attributes
    -----------------
    scores_ : sorted calibration scores ; n_calibration_ ; threshold_ : novelty above which an image is novel
    (``inf`` when there are too few calibration scores for the target: then nothing is ever flagged).
    """

    def __init__(self, target_fpr: float = 0.05) -> None:
        self.target_fpr = target_fpr

    def fit(self, scores: Sequence[float] | np.ndarray, y: object = None) -> "ConformalCalibrator":
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr!r}")
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size == 0 or not np.isfinite(s).all():
            raise ValueError("calibration needs at least one finite score")
        self.scores_ = np.sort(s)
        n = self.n_calibration_ = int(s.size)
        # p(s) <= a  <=>  #{c >= s} <= m with m = floor(a (n + 1)) - 1  <=>  s > the (m + 1)-th largest score.
        m = math.floor(self.target_fpr * (n + 1) + 1e-9) - 1
        if m < 0:
            warnings.warn(
                f"{n} calibration scores cannot resolve a false-positive rate of {self.target_fpr}: the smallest "
                f"p-value is 1/{n + 1}; no image will be flagged novel",
                stacklevel=2,
            )
            self.threshold_ = math.inf
        else:
            self.threshold_ = float(self.scores_[n - 1 - m])
        return self

    def p_values(self, novelty: Sequence[float] | np.ndarray) -> np.ndarray:
        """(1 + #{calibration >= s}) / (n + 1) for each score s; in [1/(n+1), 1]."""
        self._check_fitted()
        s = np.asarray(novelty, dtype=np.float64).reshape(-1)
        at_least = self.n_calibration_ - np.searchsorted(self.scores_, s, side="left")
        return (1.0 + at_least) / (self.n_calibration_ + 1.0)

    def is_novel(self, novelty: Sequence[float] | np.ndarray) -> np.ndarray:
        """``p_value <= target_fpr``, the same as ``novelty > threshold_``."""
        self._check_fitted()
        return np.asarray(novelty, dtype=np.float64).reshape(-1) > self.threshold_

    def decision_function(self, novelty: Sequence[float] | np.ndarray) -> np.ndarray:
        """``threshold_ - novelty``: negative for novel images, as scikit-learn's outlier detectors."""
        self._check_fitted()
        return self.threshold_ - np.asarray(novelty, dtype=np.float64).reshape(-1)

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            raise RuntimeError("ConformalCalibrator is not fitted yet; call fit(calibration_scores) first")


def drift_report(recent: Sequence[float] | np.ndarray, calibrator: ConformalCalibrator) -> dict[str, float | int | None]:
    """Recent novelty scores against the calibration distribution.

    ``fraction_novel`` should stay near ``target_fpr`` while the inputs look like the training data; the two-sample
    Kolmogorov-Smirnov test compares the whole score distributions (its p-value assumes independent scores).
    ``binomial_p_value`` tests whether the number of novel images exceeds what ``target_fpr`` allows (one-sided).
    """
    calibrator._check_fitted()
    s = np.asarray(recent, dtype=np.float64).reshape(-1)
    out: dict[str, float | int | None] = {
        "window": int(s.size),
        "target_fpr": float(calibrator.target_fpr),
        "n_calibration": calibrator.n_calibration_,
        "fraction_novel": None,
        "ks_statistic": None,
        "ks_p_value": None,
        "binomial_p_value": None,
        "median_p_value": None,
    }
    if s.size == 0:
        return out
    novel = int(calibrator.is_novel(s).sum())
    ks = stats.ks_2samp(s, calibrator.scores_)
    out.update(
        fraction_novel=novel / s.size,
        ks_statistic=float(ks.statistic),
        ks_p_value=float(ks.pvalue),
        binomial_p_value=float(stats.binomtest(novel, s.size, calibrator.target_fpr, alternative="greater").pvalue),
        median_p_value=float(np.median(calibrator.p_values(s))),
    )
    return out
