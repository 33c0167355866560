"""Rarity estimators for the audit, side by side over the same latents (issue 15).

An audit asks which rows of a dataset are rare. Each estimator here turns a model's view of the rows (the posterior
means ``mu`` and the reconstruction errors) into a rarity per row, higher = rarer:

- ``histogram``: the paper's product of per-dimension histograms (DB-VAE, Amini et al. 2019, Eq. 3-4), over whitened
  latents: :class:`debias.density.estimators.LatentHistogramDensity`. It sees the marginals only.
- ``histogram-max``: the public lab's max rule over the same histograms.
- ``knn``: k-nearest-neighbour density of the latents (:class:`debias.density.estimators.KNNDensity`): sees joint structure, so
  a rare *combination* of common values is rare.
- ``gmm``: a Gaussian mixture over the latents (scikit-learn's ``GaussianMixture``), cross-fitted in two halves.
- ``knn-recon``: :class:`LatentAndReconstructionRarity`, the kNN latent rarity plus the reconstruction error, each
  standardised on the fitted rows. A VAE spends its latent capacity on common variation; a factor that only 2 % of
  the images carry may get no latent direction at all and shows up only as a reconstruction error. When the run has
  a contrastive encoder (`debias train` trains one), a third term: the distance to the 50th nearest row in its
  features (read by their per-channel maximum: ``AUDIT_EMBEDDING_READOUT``), where near classes that the VAE
  merges (trousers among dresses) lie apart.
- ``recon``: the reconstruction error alone (a reference).

All are scikit-learn estimators (``score_samples`` higher = more typical). The rows an estimator was fitted on are
scored leaving each row out where that matters (a kNN row is not its own neighbour): :func:`fitted_rarity`.
Sampling weights are ``exp(T * rarity)`` normalised, with T chosen for a target effective sample size:
:func:`rarity_weights`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, clone
from sklearn.mixture import GaussianMixture
from sklearn.utils.validation import check_is_fitted

from debias.density.estimators import (
    KNNDensity,
    LatentHistogramDensity,
    temperature_for_ess,
)
from debias.errors import DebiasError

RARITY_ESTIMATORS = ("knn-recon", "knn", "histogram", "histogram-max", "gmm", "recon")
DEFAULT_ESTIMATOR = "knn-recon"
#: How the audit reads the run's contrastive encoder for knn-recon's third term (``readout`` of
#: :meth:`debias.models.contrastive.ContrastiveEncoder.forward`): the per-channel maximum of its last map, as the
#: novelty score does. The mean blends a small part (a sneaker's closed toe) into the whole image; on issue 15's
#: benchmark the maximum moved the default rule on every row measured or left it within 0.001 (cut sneakers 0.49 ->
#: 0.70, T-shirts 0.856 -> 0.873, UTKFace black faces 0.678 -> 0.695 and their weight ratio 1.57x -> 1.69x;
#: docs/benchmarks.md, issue 15, "Session 16"). Every engine and `debias augment --model` read it here, so that one
#: audit gives one answer.
AUDIT_EMBEDDING_READOUT = "max"


def audit_features(mu: np.ndarray, recon_error: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
    """(n, d + 1): the posterior means and the per-image reconstruction error, the input of every estimator here;
    with ``embeddings`` (n, e), (n, d + e + 1) = [mu | embeddings | recon_error], the input of
    :class:`LatentAndReconstructionRarity` with ``embedding_dims=e``."""
    parts = [np.asarray(mu, np.float64)]
    if embeddings is not None:
        parts.append(np.asarray(embeddings, np.float64))
    return np.hstack([*parts, np.asarray(recon_error, np.float64)[:, None]])


def _robust_z(values: np.ndarray, centre: float, scale: float) -> np.ndarray:
    return (values - centre) / scale


def _centre_scale(values: np.ndarray) -> tuple[float, float]:
    # Median and the normal-consistent MAD: a few extreme rows (the rare ones we look for) do not set the scale.
    centre = float(np.median(values))
    scale = float(1.4826 * np.median(np.abs(values - centre)))
    return centre, scale if scale > 0 else float(np.std(values)) or 1.0


class LatentAndReconstructionRarity(OutlierMixin, BaseEstimator):
    """Rarity = z(kNN rarity of the latents) + z(log reconstruction error) [+ z(kNN rarity of the embeddings)], each
    a robust z-score on the fitted rows.

    Input: :func:`audit_features` rows, [mu | recon_error], or [mu | embeddings | recon_error] with
    ``embedding_dims`` = the number of embedding columns. The kNN parts are ``d log r_k`` (minus the log density of
    :class:`~debias.density.estimators.KNNDensity` up to a constant); the reconstruction part is the log mean squared
    error. ``recon_weight`` / ``embedding_weight`` scale the second / third term (0 = left out). The terms are one
    number per row on a common scale, so none dominates because of its units.

    k = 5 for the latents (as PyOD's KNN): on the audit benchmark every dataset but one ranked its rare group at least
    as well with k = 5 as with 10, 20, 50 or 100. k = 50 for the embeddings (a contrastive encoder's unit-norm
    features): there a group of 20 similar rows is its own dense neighbourhood at k = 5 (a cut Fashion-MNIST class:
    AUROC 0.20 for trousers) and sparse once k exceeds its size (0.95 at k = 50); docs/benchmarks.md, issue 15.

    Fitted attributes: knn_, knn_centre_, knn_scale_, recon_centre_, recon_scale_, embedding_knn_ (None without
    embeddings), embedding_centre_, embedding_scale_, n_features_in_, offset_.
    """

    def __init__(self, n_neighbors: int = 5, n_components: int | None = 32, recon_weight: float = 1.0,
                 contamination: float = 0.05, embedding_dims: int = 0, embedding_neighbors: int = 50,
                 embedding_weight: float = 1.0) -> None:
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.recon_weight = recon_weight
        self.contamination = contamination
        self.embedding_dims = embedding_dims
        self.embedding_neighbors = embedding_neighbors
        self.embedding_weight = embedding_weight

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(latents, embeddings or None, reconstruction errors) of :func:`audit_features` rows."""
        e = int(self.embedding_dims)
        latents = X[:, : X.shape[1] - 1 - e]
        return latents, (X[:, latents.shape[1] : -1] if e else None), X[:, -1]

    def fit(self, X: np.ndarray, y: object = None) -> "LatentAndReconstructionRarity":
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] < 2 + int(self.embedding_dims):
            raise ValueError(f"expected audit_features rows: [mu | {self.embedding_dims} embedding columns | "
                             "recon_error], at least one latent column")
        self.n_features_in_ = X.shape[1]
        latents, embeddings, recon = self._split(X)
        self.knn_ = KNNDensity(n_neighbors=self.n_neighbors, n_components=self.n_components).fit(latents)
        knn_rarity = -self.knn_.score_fitted()
        self.knn_centre_, self.knn_scale_ = _centre_scale(knn_rarity)
        self.recon_centre_, self.recon_scale_ = _centre_scale(np.log(np.maximum(recon, 1e-12)))
        self.embedding_knn_ = None
        embedding_rarity = None
        if embeddings is not None:
            # Every dimension as it is (no rotation, no whitening): distances are the features' own.
            self.embedding_knn_ = KNNDensity(n_neighbors=self.embedding_neighbors, n_components=None).fit(embeddings)
            embedding_rarity = -self.embedding_knn_.score_fitted()
            self.embedding_centre_, self.embedding_scale_ = _centre_scale(embedding_rarity)
        self.offset_ = float(np.quantile(-self._combine(knn_rarity, recon, embedding_rarity), self.contamination))
        return self

    def _terms(self, knn_rarity: np.ndarray, recon_error: np.ndarray,
               embedding_rarity: np.ndarray | None) -> dict[str, np.ndarray]:
        terms = {
            "latent": _robust_z(knn_rarity, self.knn_centre_, self.knn_scale_),
            "reconstruction": _robust_z(np.log(np.maximum(recon_error, 1e-12)), self.recon_centre_, self.recon_scale_),
        }
        if embedding_rarity is not None:
            terms["embedding"] = _robust_z(embedding_rarity, self.embedding_centre_, self.embedding_scale_)
        return terms

    def _combine(self, knn_rarity: np.ndarray, recon_error: np.ndarray,
                 embedding_rarity: np.ndarray | None = None) -> np.ndarray:
        terms = self._terms(knn_rarity, recon_error, embedding_rarity)
        total = terms["latent"] + self.recon_weight * terms["reconstruction"]
        return total + self.embedding_weight * terms["embedding"] if "embedding" in terms else total

    def _rarities(self, X: np.ndarray, fitted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(latent kNN rarity, reconstruction error, embedding kNN rarity or None) of rows ``X``; ``fitted``: X are
        the fitted rows, each left out of its own neighbourhood."""
        check_is_fitted(self, "knn_")
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected {self.n_features_in_} columns (audit_features with {self.embedding_dims} "
                             f"embedding columns), got {X.shape[1]}")
        latents, embeddings, recon = self._split(X)
        knn = -(self.knn_.score_fitted() if fitted else self.knn_.score_samples(latents))
        emb = None
        if self.embedding_knn_ is not None:
            emb = -(self.embedding_knn_.score_fitted() if fitted else self.embedding_knn_.score_samples(embeddings))
        return knn, recon, emb

    def components(self, X: np.ndarray, fitted: bool = False) -> dict[str, np.ndarray]:
        """The standardised terms per row ("latent", "reconstruction", and "embedding" when fitted with embeddings):
        which one makes a row rare."""
        return self._terms(*self._rarities(X, fitted))

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Minus the rarity of new rows (higher = more typical)."""
        return -self._combine(*self._rarities(X, fitted=False))

    def score_fitted(self, X: np.ndarray) -> np.ndarray:
        """The same for the fitted rows ``X`` themselves, each left out of its own neighbourhood."""
        return -self._combine(*self._rarities(X, fitted=True))

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.score_samples(X) - self.offset_

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.where(self.decision_function(X) < 0, -1, 1)


def build_rarity_estimator(name: str, **options: object) -> BaseEstimator:
    """A fresh estimator by name (:data:`RARITY_ESTIMATORS`); ``options`` are its parameters."""
    if name == "knn-recon":
        return LatentAndReconstructionRarity(**options)  # type: ignore[arg-type]
    if name == "knn":
        return KNNDensity(**{"n_neighbors": 5, **options})  # type: ignore[arg-type]
    if name == "histogram":
        return LatentHistogramDensity(**options)  # type: ignore[arg-type]
    if name == "histogram-max":
        return LatentHistogramDensity(**{"combine": "max", **options})  # type: ignore[arg-type]
    if name == "gmm":
        return GaussianMixture(**{"n_components": 8, "covariance_type": "full", "reg_covar": 1e-4,
                                  "random_state": 0, **options})  # type: ignore[arg-type]
    if name == "recon":
        return _ReconstructionOnly()
    raise ValueError(f"unknown rarity estimator {name!r}; choose from {', '.join(RARITY_ESTIMATORS)}")


class _ReconstructionOnly(BaseEstimator):
    """The log reconstruction error as the rarity (a reference, not a density)."""

    def fit(self, X: np.ndarray, y: object = None) -> "_ReconstructionOnly":
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.log(np.maximum(np.asarray(X, np.float64)[:, -1], 1e-12))


def fitted_rarity(estimator: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """Fit ``estimator`` on :func:`audit_features` rows ``X`` and return the rarity of those same rows (higher =
    rarer), each row left out of its own neighbourhood where the estimator has neighbours."""
    X = np.asarray(X, dtype=np.float64)
    latents = X[:, :-1]
    if isinstance(estimator, LatentAndReconstructionRarity):
        return -estimator.fit(X).score_fitted(X)
    if isinstance(estimator, _ReconstructionOnly):
        return -estimator.fit(X).score_samples(X)
    if isinstance(estimator, KNNDensity):
        return -estimator.fit(latents).score_fitted()
    if isinstance(estimator, GaussianMixture) and len(latents) >= 4 * estimator.n_components:
        # Cross-fitted in two halves: a mixture fitted on a row can give an odd row a component of its own and call
        # it dense. Each half is scored by the mixture of the other half; the estimator itself is fitted on all rows.
        rng = np.random.default_rng(0)
        half = rng.permutation(len(latents)) % 2 == 0
        rarity = np.empty(len(latents))
        for part in (half, ~half):
            rarity[part] = -clone(estimator).fit(latents[~part]).score_samples(latents[part])
        estimator.fit(latents)
        return rarity
    return -estimator.fit(latents).score_samples(latents)


def rarity_of_new_rows(estimator: BaseEstimator, mu: np.ndarray, recon_error: np.ndarray,
                       embeddings: np.ndarray | None = None) -> np.ndarray:
    """Rarity (higher = rarer) of rows the fitted ``estimator`` has not seen, from their latents and reconstruction
    errors (and embeddings, when it was fitted with them): the same inputs :func:`fitted_rarity` gave it."""
    if getattr(estimator, "embedding_knn_", None) is not None and embeddings is None:
        raise DebiasError("this rarity was fitted with the contrastive encoder's embeddings: pass them for new rows")
    X = audit_features(mu, recon_error, embeddings if getattr(estimator, "embedding_dims", 0) else None)
    if isinstance(estimator, (LatentAndReconstructionRarity, _ReconstructionOnly)):
        return -estimator.score_samples(X)
    return -estimator.score_samples(X[:, :-1])


def tempered_weights(rarity: np.ndarray, temperature: float) -> np.ndarray:
    """Sampling probabilities ∝ exp(T * rarity), summing to 1 (T = 1 on a negative log density: inverse density)."""
    r = np.asarray(rarity, dtype=np.float64)
    w = np.exp(temperature * (r - r.max()))
    return w / w.sum()


def rarity_weights(rarity: np.ndarray, target_ess: float = 0.5) -> tuple[np.ndarray, float]:
    """:func:`tempered_weights` with T chosen so that their effective sample size is ``target_ess`` of the rows
    (:func:`debias.density.estimators.temperature_for_ess`); returns (weights, T)."""
    t = temperature_for_ess(np.asarray(rarity, dtype=np.float64), target_ess)
    return tempered_weights(rarity, t), t


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
class AuditRarity:
    """What the audit's rarity stage produced for the rows: rarity (higher = rarer), sampling weights (sum to 1), the
    temperature that set them, the fitted histogram density (always: the report's and browser's histograms and the
    per-dimension tails come from it) and, for ``knn-recon``, each row's standardised terms (two, or three with the
    contrastive encoder's embeddings)."""

    estimator: str
    rarity: np.ndarray
    weights: np.ndarray
    temperature: float
    histogram: LatentHistogramDensity
    components: dict[str, np.ndarray] | None = None
    fitted: BaseEstimator | None = None  # the fitted estimator, to score new rows (rarity_of_new_rows)


def fit_audit_rarity(
    mu: np.ndarray, recon_error: np.ndarray, estimator: str = DEFAULT_ESTIMATOR,
    density: DensityOptions | None = None, n_neighbors: int = 5, embeddings: np.ndarray | None = None,
) -> AuditRarity:
    """The audit's rarity stage, shared by `debias audit` (both engines) and `debias augment --model`: fit the
    chosen estimator on the rows' latents (and reconstruction errors) and turn its rarity into sampling weights,
    tempered to ``density.target_ess`` (or at the fixed ``density.temperature``). ``embeddings``: the rows' features
    from the run's contrastive encoder; ``knn-recon`` adds their kNN rarity as a third term, the others ignore them."""
    density = density or DensityOptions()
    histogram = (replace(density, combine="max") if estimator == "histogram-max" else density).build().fit(mu)
    if estimator in ("histogram", "histogram-max"):
        return AuditRarity(estimator, -histogram.score_samples(mu), histogram.sampling_weights(mu),
                           float(histogram.temperature_), histogram, fitted=histogram)
    use_embeddings = embeddings is not None and estimator == "knn-recon"
    X = audit_features(mu, recon_error, embeddings if use_embeddings else None)
    options: dict[str, object] = {"n_neighbors": n_neighbors} if estimator in ("knn", "knn-recon") else {}
    if use_embeddings:
        options["embedding_dims"] = int(np.asarray(embeddings).shape[1])
    est = build_rarity_estimator(estimator, **options)
    rarity = fitted_rarity(est, X)
    if density.temperature == "auto":
        weights, t = rarity_weights(rarity, density.target_ess)
    else:
        t = float(density.temperature)
        weights = tempered_weights(rarity, t)
    components = est.components(X, fitted=True) if isinstance(est, LatentAndReconstructionRarity) else None
    return AuditRarity(estimator, rarity, weights, t, histogram, components, fitted=est)
