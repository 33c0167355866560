"""Per-latent-dimension histogram density and DB-VAE resampling weights (Amini et al., AIES 2019).

The paper approximates the latent distribution by independent histograms (Eq. 3):

    Q(z) ~= prod_i Q_i(z_i)

and samples a training point with probability (Eq. 4)

    W(z) ∝ prod_i 1 / (Q_i(z_i) + alpha).

Over 32-128 dimensions that product spans hundreds of orders of magnitude, so it is computed in log space and, left
untempered, puts nearly all the mass on one or two samples (effective sample size ~1). ``temperature`` scales the
log-weights, W ∝ exp(-T * sum_i log(Q_i + alpha)); ``temperature="auto"`` picks the T at which the effective sample
size equals ``target_ess`` * n. ``combine="max"`` is the rule of the public MIT lab instead: each dimension's
inverse density is normalised over the data and the sample takes the largest of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

_COMBINE = ("product", "max")


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: n for uniform weights, 1 when one sample takes all."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    return float(total * total / np.square(w).sum()) if total > 0 else 0.0


class LatentHistogramDensity(OutlierMixin, BaseEstimator):
    """Histogram density over latent dimensions, scikit-learn style.

    Parameters
    ----------
    bins : number of equal-width bins per dimension over the fitted range (the paper and lab use 10).
    alpha : smoothing added to each bin's probability, Eq. 4's alpha: bounds a sample's weight in an empty region.
    combine : ``"product"`` (paper Eq. 3-4) or ``"max"`` (the public lab's rule).
    temperature : ``"auto"`` or a float T >= 0 multiplying the product's log-weights; T = 1 is the untempered
        paper rule, T = 0 gives uniform weights. Ignored by ``combine="max"``.
    target_ess : with ``temperature="auto"``, the effective sample size sought, as a fraction of the fitted rows.
    dims : ``"all"``, ``"active"`` (axes whose spread is at least ``active_threshold`` times the largest axis's
        standard deviation: collapsed VAE dimensions, or with ``whiten`` the trailing principal components, carry
        noise rather than structure), or explicit latent indices.
    active_threshold : see ``dims``.
    whiten : rotate the latents onto their principal axes (PCA) before the histograms, so that the product's
        independence assumption holds at least to second order. On by default: VAE latents are correlated, and on
        the built-in shapes set it lifts the AUROC of rarity for the planted rare group from 0.83 to 0.95
        (docs/benchmarks.md).
    contamination : fraction of the fitted rows that ``decision_function`` puts below 0 (sets ``offset_``).

    Fitted attributes
    -----------------
    dims_ : indices of the latent dimensions used; edges_ : (d, bins + 1) bin edges; probs_ : (d, bins) bin
    probabilities Q_i; temperature_ : the temperature used; ess_ : effective sample size of the weights on the fitted
    rows; offset_ : threshold of ``decision_function``; n_samples_fit_ ; mean_, components_ (with ``whiten``: the
    principal axes kept, one histogram each);
    max_norm_ : (d,) per-dimension normalisers of the ``max`` rule.
    """

    def __init__(
        self,
        bins: int = 10,
        alpha: float = 0.001,
        combine: str = "product",
        temperature: float | str = "auto",
        target_ess: float = 0.5,
        dims: str | Sequence[int] = "all",
        active_threshold: float = 0.1,
        whiten: bool = True,
        contamination: float = 0.05,
    ) -> None:
        self.bins = bins
        self.alpha = alpha
        self.combine = combine
        self.temperature = temperature
        self.target_ess = target_ess
        self.dims = dims
        self.active_threshold = active_threshold
        self.whiten = whiten
        self.contamination = contamination

    # -- fitting ---------------------------------------------------------------------------------------------------
    def fit(self, Z: np.ndarray, y: object = None) -> "LatentHistogramDensity":
        Z = self._check_array(Z)
        self._check_params()
        n, d = Z.shape
        self.n_features_in_ = d
        self.n_samples_fit_ = n
        # Explicit indices pick latent dimensions; "active" picks the axes that carry spread, after the rotation
        # when there is one (it then keeps the leading principal components).
        base = np.arange(d) if isinstance(self.dims, str) else self._select_dims(Z)
        X = Z[:, base]
        if self.whiten:
            self.mean_ = X.mean(0)
            # Principal axes from the SVD of the centred data; no scaling needed, the histograms adapt to the range.
            _, _, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
            X = (X - self.mean_) @ vt.T
        keep = self._select_dims(X) if isinstance(self.dims, str) else np.arange(X.shape[1])
        X = X[:, keep]
        if self.whiten:
            self.dims_, self.components_ = base, vt[keep]
        else:
            self.dims_ = base[keep]
        lo, hi = X.min(0), X.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        self.edges_ = lo[:, None] + span[:, None] * np.linspace(0.0, 1.0, self.bins + 1)[None, :]
        idx = self._bin_index(X)
        counts = np.stack([np.bincount(idx[:, j], minlength=self.bins) for j in range(X.shape[1])])
        self.counts_ = counts
        self.probs_ = counts / n  # Q_i: probability of each bin, so that alpha means the same as in the paper
        if self.combine == "max":
            # Lab rule: per dimension, 1 / (Q_i + alpha) normalised over the data; remember the normalisers so that
            # new samples are scored on the same scale.
            inv = 1.0 / (np.take_along_axis(self.probs_, idx.T, axis=1) + self.alpha)  # (d, n)
            self.max_norm_ = inv.sum(1)
        log_q = self._log_q(idx)
        self.temperature_ = self._resolve_temperature(log_q)
        w = self._weights_from_log_q(log_q, idx)
        self.ess_ = effective_sample_size(w)
        self.offset_ = float(np.quantile(self._score_from_log_q(log_q, idx), self.contamination))
        return self

    # -- public scoring --------------------------------------------------------------------------------------------
    def score_samples(self, Z: np.ndarray) -> np.ndarray:
        """Log density of each row, higher = more typical.

        ``product``: sum_i log(Q_i(z_i) + alpha) (the log of Eq. 3 with the smoothing of Eq. 4).
        ``max``: minus the log of the lab's weight, max_i [1 / (Q_i + alpha)] / norm_i.
        """
        idx = self._transform_bins(Z)
        return self._score_from_log_q(self._log_q(idx), idx)

    def decision_function(self, Z: np.ndarray) -> np.ndarray:
        """``score_samples - offset_``: negative for rows rarer than the ``contamination`` quantile of the fit data."""
        return self.score_samples(Z) - self.offset_

    def predict(self, Z: np.ndarray) -> np.ndarray:
        """+1 for typical rows, -1 for rare ones (``decision_function < 0``), as scikit-learn's outlier detectors."""
        return np.where(self.decision_function(Z) < 0, -1, 1)

    def sampling_weights(self, Z: np.ndarray) -> np.ndarray:
        """Resampling probability of each row of Z (sums to 1), Eq. 4 tempered, or the lab's max rule."""
        idx = self._transform_bins(Z)
        return self._weights_from_log_q(self._log_q(idx), idx)

    def per_dim_tail(self, Z: np.ndarray) -> np.ndarray:
        """(n, d) probability mass of bins no more likely than each row's own bin, per used dimension.

        Small values say which dimensions make a sample unusual (its value sits in a rarely populated bin).
        """
        idx = self._transform_bins(Z)
        out = np.empty(idx.shape, dtype=np.float64)
        for j, (order, cum) in enumerate(self._tail_tables()):
            # mass of bins with probability <= p[bin]
            out[:, j] = cum[np.searchsorted(order, self.probs_[j][idx[:, j]], side="right") - 1]
        return out

    def _tail_tables(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per dimension, the bins' probabilities sorted and their running sum: computed once, not per call."""
        if getattr(self, "_tail_cache_of", None) is not self.probs_:  # refitting replaces probs_
            self._tail_cache = [(order, np.cumsum(order)) for order in (np.sort(p) for p in self.probs_)]
            self._tail_cache_of = self.probs_
        return self._tail_cache

    # -- internals -------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.combine not in _COMBINE:
            raise ValueError(f"combine must be one of {_COMBINE}, got {self.combine!r}")
        if not (isinstance(self.bins, (int, np.integer)) and self.bins >= 1):
            raise ValueError(f"bins must be a positive integer, got {self.bins!r}")
        if self.alpha < 0:
            raise ValueError("alpha must be >= 0")
        if self.temperature != "auto" and not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be 'auto' or a number >= 0, got {self.temperature!r}")
        if not 0 < self.target_ess <= 1:
            raise ValueError("target_ess must be in (0, 1]")

    @staticmethod
    def _check_array(Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[0] == 0:
            raise ValueError(f"expected a non-empty 2-D array of latents, got shape {Z.shape}")
        if not np.isfinite(Z).all():
            raise ValueError("latents contain NaN or infinite values")
        return Z

    def _select_dims(self, Z: np.ndarray) -> np.ndarray:
        d = Z.shape[1]
        if isinstance(self.dims, str):
            if self.dims == "all":
                return np.arange(d)
            if self.dims == "active":
                std = Z.std(0)
                keep = np.flatnonzero(std >= self.active_threshold * std.max())
                return keep if keep.size else np.arange(d)
            raise ValueError(f"dims must be 'all', 'active' or a list of indices, got {self.dims!r}")
        dims = np.asarray(list(self.dims), dtype=int)
        if dims.size == 0 or dims.min() < 0 or dims.max() >= d:
            raise ValueError(f"dims out of range for {d} latent dimensions: {list(self.dims)}")
        return dims

    def _transform_bins(self, Z: np.ndarray) -> np.ndarray:
        if not hasattr(self, "edges_"):
            raise NotFittedError("LatentHistogramDensity is not fitted yet; call fit(Z) first")
        Z = self._check_array(Z)
        if Z.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} latent dimensions, got {Z.shape[1]}")
        X = Z[:, self.dims_]
        if self.whiten:
            X = (X - self.mean_) @ self.components_.T
        return self._bin_index(X)

    def _bin_index(self, X: np.ndarray) -> np.ndarray:
        # Values outside the fitted range fall into the outermost bins (the tails are what rarity is about).
        idx = np.empty(X.shape, dtype=np.int64)
        for j in range(X.shape[1]):
            idx[:, j] = np.searchsorted(self.edges_[j, 1:-1], X[:, j], side="right")
        return idx

    def _log_q(self, idx: np.ndarray) -> np.ndarray:
        """(n,) sum over used dims of log(Q_i(z_i) + alpha)."""
        q = np.take_along_axis(self.probs_, idx.T, axis=1)  # (d, n)
        return np.log(q + self.alpha).sum(0)

    def _max_rule(self, idx: np.ndarray) -> np.ndarray:
        inv = 1.0 / (np.take_along_axis(self.probs_, idx.T, axis=1) + self.alpha)
        return (inv / self.max_norm_[:, None]).max(0)

    def _score_from_log_q(self, log_q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if self.combine == "max":
            return -np.log(self._max_rule(idx))
        return log_q

    def _weights_from_log_q(self, log_q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if self.combine == "max":
            w = self._max_rule(idx)
            return w / w.sum()
        logits = -self.temperature_ * log_q
        return np.exp(logits - logsumexp(logits))

    def _resolve_temperature(self, log_q: np.ndarray) -> float:
        if self.combine == "max":
            return 1.0
        if self.temperature != "auto":
            return float(self.temperature)
        return temperature_for_ess(-log_q, self.target_ess)


def temperature_for_ess(rarity: np.ndarray, target_ess: float) -> float:
    """The temperature T at which weights ∝ exp(T * rarity) have an effective sample size of ``target_ess`` * n.

    ``rarity`` is a negative log density (any additive constant): T = 1 is untempered inverse-density sampling, T = 0
    uniform sampling. ESS falls monotonically as T grows (2K(T) - K(2T) has derivative 2K'(T) - 2K'(2T) <= 0 for the
    convex cumulant K of the rarity), so bisection in log T finds it; T is clipped to [1e-8, 100]."""
    r = np.asarray(rarity, dtype=np.float64)
    target = target_ess * r.size

    def ess(t: float) -> float:
        logits = t * r
        return effective_sample_size(np.exp(logits - logits.max()))

    lo, hi = -8.0, 2.0  # log10 T
    if ess(10.0**hi) >= target:
        return 10.0**hi
    if ess(10.0**lo) <= target:
        return 10.0**lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if ess(10.0**mid) > target:
            lo = mid
        else:
            hi = mid
    return 10.0 ** (0.5 * (lo + hi))


class KNNDensity(BaseEstimator):
    """k-nearest-neighbour density over feature vectors (Loftsgaarden & Quesenberry 1965), scikit-learn style.

    log p(x) = log k - log n - log V_d - d log r_k(x) + const, with r_k the distance to the k-th nearest fitted row and
    d the number of dimensions used; the constants are dropped, so ``score_samples`` = -d log r_k(x). Unlike a product
    of per-dimension histograms it sees joint structure: a rare *combination* of common values (a warm-tinted male
    face among warm female and cool male faces) sits far from every fitted row although each coordinate is common.

    Parameters
    ----------
    n_neighbors : k. Large enough that a small group of similar rows is not its own neighbourhood (k=1 finds single
        odd images, k=20 finds rare regions).
    n_components : the features are centred and projected onto this many leading principal axes first (distances in
        thousands of correlated dimensions are dominated by noise); None keeps every dimension.
    whiten : scale the principal axes to unit variance. Off by default: the leading axes are what the features mostly
        encode (for a classifier's features, what it relies on), and equal scaling would let noise axes count as much.
    contamination : fraction of the fitted rows that ``decision_function`` puts below 0 (sets ``offset_``).

    Fitted attributes: mean_, components_, scale_, n_features_in_, n_samples_fit_, n_dims_, offset_.
    """

    def __init__(
        self, n_neighbors: int = 20, n_components: int | None = 32, whiten: bool = False, contamination: float = 0.05
    ) -> None:
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.whiten = whiten
        self.contamination = contamination

    def fit(self, X: np.ndarray, y: object = None) -> "KNNDensity":
        from sklearn.neighbors import NearestNeighbors

        X = LatentHistogramDensity._check_array(X)
        if not (isinstance(self.n_neighbors, (int, np.integer)) and self.n_neighbors >= 1):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        n, d = X.shape
        self.n_features_in_, self.n_samples_fit_ = d, n
        self.mean_ = X.mean(0)
        if self.n_components is None and not self.whiten:
            # Every dimension as it is (components_ None: no rotation). A rotation onto principal axes would keep only
            # the directions the fitted rows span (at most n - 1 of them: 24 rows of 128-d embeddings), and a new
            # row's distance along the others would be lost.
            keep, self.components_, self.scale_ = d, None, np.ones(d)
        else:
            keep = d if self.n_components is None else max(1, min(int(self.n_components), d, n))
            _, s, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
            keep = min(keep, len(vt))
            self.components_ = vt[:keep]
            sd = s[:keep] / np.sqrt(max(n - 1, 1))
            self.scale_ = np.where(sd > 0, sd, 1.0) if self.whiten else np.ones(keep)
        self._fit_points = self._project(X)
        self.n_dims_ = keep
        self._k = max(1, min(int(self.n_neighbors), n - 1)) if n > 1 else 1
        self._nn = NearestNeighbors(n_neighbors=min(self._k + 1, n)).fit(self._fit_points)
        self.offset_ = float(np.quantile(self.score_fitted(), self.contamination))
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Log density (up to a constant) of new rows, higher = more typical: -d log r_k to the fitted rows."""
        check_is_fitted(self, "components_")
        X = LatentHistogramDensity._check_array(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} features, got {X.shape[1]}")
        dist, _ = self._nn.kneighbors(self._project(X), n_neighbors=self._k)
        return self._log_density(dist[:, -1])

    def score_fitted(self) -> np.ndarray:
        """The same for the fitted rows themselves, each leaving itself out (its own distance 0 is not a neighbour)."""
        check_is_fitted(self, "components_")
        if self.n_samples_fit_ == 1:
            return np.zeros(1)
        dist, _ = self._nn.kneighbors(self._fit_points, n_neighbors=self._k + 1)
        return self._log_density(dist[:, -1])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.score_samples(X) - self.offset_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.where(self.decision_function(X) < 0, -1, 1)

    def _project(self, X: np.ndarray) -> np.ndarray:
        centred = X - self.mean_
        return (centred if self.components_ is None else centred @ self.components_.T) / self.scale_

    def _log_density(self, r_k: np.ndarray) -> np.ndarray:
        # A floor on r_k: duplicated rows would otherwise get an infinite density.
        return -self.n_dims_ * np.log(np.maximum(r_k, 1e-12))
