"""The Python API: the CLI's stages as functions and scikit-learn estimators (``import debias``).

    imgs = debias.load_images("faces/manifest.csv", where={"split": "train"}, image_size=64)
    vae = debias.train_vae(imgs, out="runs/faces", epochs=10, latent_dim=32)
    audit = debias.RarityAudit(vae).fit(imgs)                 # audit.scores_, audit.sampling_weights(other)
    det = debias.NoveltyDetector(vae, target_fpr=0.05).fit(imgs)
    det.predict(new_images)                                   # +1 typical / -1 novel

Sign convention (scikit-learn's): ``score_samples`` is higher for more *normal* inputs, ``decision_function`` is
``score_samples - offset_`` (negative = novel) and ``predict`` is +1 / -1. PyOD's ``decision_function`` is the
opposite (higher = more outlying), so negate it when comparing the two.

Every method that takes images takes the same inputs (see :mod:`debias.data.inputs`): an ImageSet, a source string,
a list of paths or PIL images, a uint8 array (N, H, W[, C]) or a float tensor (N, C, H, W) in [0, 1]; they are
brought to the model's size and channels the way the CLI's decoder does it. :class:`RarityAudit` also takes
precomputed embeddings (``fit(embeddings=array)``), e.g. from CLIP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted

from debias.data import ImageSet
from debias.data import load_images as _load_images
from debias.data.inputs import ImagesLike, as_image_set, where_list
from debias.data.splits import DEFAULT_CALIBRATION_FRACTION
from debias.density.detector import (
    DEFAULT_TARGET_FPR,
    EmbeddingDetector,
    embed_images,
    fit_detector,
    fit_embedding_detector,
)
from debias.density.encoding import Encoded, encode_images
from debias.density.novelty import DEFAULT_EMBEDDING_READOUT
from debias.density.rarity import (
    AUDIT_EMBEDDING_READOUT,
    DEFAULT_ESTIMATOR,
    DensityOptions,
    fit_audit_rarity,
    rarity_of_new_rows,
    tempered_weights,
)
from debias.errors import DebiasError
from debias.models import ConvVAE
from debias.models.contrastive import ContrastiveEncoder
from debias.training.contrastive import ContrastiveTrainConfig, encoder_path
from debias.training.contrastive import load_encoder as _load_encoder
from debias.training.vae import TrainConfig, fit_vae_on
from debias.training.vae import load_model as _load_model

__all__ = ["load_images", "train_vae", "load_vae", "load_encoder", "RarityAudit", "NoveltyDetector"]


def load_images(
    source: str | Path,
    *,
    where: Mapping[str, Any] | Sequence[str] | None = None,
    image_size: int = 64,
    channels: int | None = None,
    progress: bool = False,
) -> ImageSet:
    """Read a SOURCE (image folder, CSV/Parquet manifest with a ``path`` column, MNIST idx folder, ``builtin:NAME``)
    as an :class:`ImageSet`: ``.images`` uint8 (N, H, W, C), ``.table`` the manifest's rows. ``where`` keeps rows by
    column value: ``{"split": "train"}``; a list of values keeps any of them. Decoded once, then cached."""
    return _load_images(str(source), where=where_list(where), image_size=image_size, channels=channels,
                        progress=progress)


def train_vae(
    images: ImagesLike,
    *,
    out: str | Path,
    epochs: int = 10,
    latent_dim: int = 32,
    beta: float = 1.0,
    width: int = 32,
    label: str | None = None,
    image_size: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    contrastive_epochs: int = 15,
    contrastive_min_steps: int = 600,
    contrastive_labels: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> ConvVAE:
    """Train a beta-VAE (a DB-VAE with a class head when ``label`` names a column) into the run directory ``out``,
    as `debias train` does (checkpoint per epoch, ``resume=True`` continues), and return the trained model.
    ``calibration_fraction`` of the images are held out of training; a :class:`NoveltyDetector` loaded from the run
    (:meth:`NoveltyDetector.load`) calibrates on them. ``contrastive_epochs`` > 0 then trains the novelty score's
    contrastive encoder on the same images into ``out/contrastive`` (:func:`load_encoder`), for at least
    ``contrastive_min_steps`` steps (more epochs on small sets; 0 = exactly ``contrastive_epochs``);
    ``contrastive_labels=True`` trains it with ``label`` (SupCon) instead of label-free."""
    if isinstance(images, ImageSet):
        data = images if image_size in (None, images.image_size) else as_image_set(images, image_size, images.channels)
    elif isinstance(images, (str, Path)):
        data = _load_images(str(images), image_size=image_size or 64, progress=progress)
    else:
        data = as_image_set(images, image_size or 64, _channels_of(images))
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    contrastive = ContrastiveTrainConfig(epochs=contrastive_epochs, min_steps=contrastive_min_steps, seed=seed,
                                         device=device, use_labels=contrastive_labels)
    path = fit_vae_on(data, Path(out), config, latent_dim=latent_dim, beta=beta, width=width, label=label,
                      source=data.source, calibration_fraction=calibration_fraction, contrastive=contrastive,
                      resume=resume, progress=progress)
    return load_vae(path.parent)


def load_vae(run: str | Path, device: str = "cpu") -> ConvVAE:
    """The trained model of a run directory (``model.pt``), in eval mode."""
    model, _ = _load_model(run, device)
    return model


def load_encoder(run: str | Path, device: str | torch.device = "cpu") -> ContrastiveEncoder | None:
    """The contrastive encoder of a run directory (``contrastive/encoder.pt``), in eval mode; None when the run was
    trained without one (``contrastive_epochs=0``)."""
    path = encoder_path(run)
    return _load_encoder(path, device)[0] if path.exists() else None


def _channels_of(images: Any) -> int:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
    if isinstance(arr, np.ndarray):
        if np.issubdtype(arr.dtype, np.floating):
            return int(arr.shape[1]) if arr.ndim == 4 else 1
        return int(arr.shape[-1]) if arr.ndim == 4 and arr.shape[-1] in (1, 3) else (1 if arr.ndim == 3 else 3)
    return 3


def _encode(model: ConvVAE, X: ImagesLike, batch_size: int) -> tuple[ImageSet, Encoded]:
    cfg = model.config
    data = as_image_set(X, cfg.image_size, cfg.channels)
    return data, encode_images(model, data, batch_size=batch_size, progress=False)


class RarityAudit(BaseEstimator):
    """Rarity of every image of a set (higher = rarer) and sampling weights that favour the rare ones.

    ``vae``: a trained model (:func:`train_vae`, :func:`load_vae`); not needed with ``fit(embeddings=...)``.
    ``estimator``: one of :data:`debias.density.rarity.RARITY_ESTIMATORS` (default ``knn-recon``: kNN density of the
    latents plus the reconstruction error; with embeddings, which have no reconstruction, ``knn``). The histogram
    options (``bins``, ``alpha``, ``combine``, ``dims``, ``whiten``) and the weights' ``target_ess`` or fixed
    ``temperature`` are those of `debias audit`. ``encoder``: the run's contrastive encoder (:func:`load_encoder`);
    with ``knn-recon`` the kNN rarity of its features is a third term, as `debias audit` adds it for a run that has
    one (None: the VAE's two terms only, `debias audit --no-encoder`).

    Fitted attributes: ``scores_`` (DataFrame: the source's columns + rarity, weight, recon_error), ``rarity_``,
    ``weights_`` (sum to 1), ``temperature_``, ``estimator_``.
    """

    def __init__(
        self,
        vae: ConvVAE | None = None,
        *,
        encoder: ContrastiveEncoder | None = None,
        estimator: str | None = None,
        n_neighbors: int = 5,
        bins: int = 10,
        alpha: float = 0.001,
        combine: str = "product",
        dims: str = "all",
        whiten: bool = True,
        target_ess: float = 0.5,
        temperature: float | str = "auto",
        batch_size: int = 256,
    ) -> None:
        self.vae = vae
        self.encoder = encoder
        self.estimator = estimator
        self.n_neighbors = n_neighbors
        self.bins = bins
        self.alpha = alpha
        self.combine = combine
        self.dims = dims
        self.whiten = whiten
        self.target_ess = target_ess
        self.temperature = temperature
        self.batch_size = batch_size

    def _density(self) -> DensityOptions:
        opts = DensityOptions(bins=self.bins, alpha=self.alpha, combine=self.combine, temperature=self.temperature,
                              target_ess=self.target_ess, dims=self.dims, whiten=self.whiten)
        opts.check()
        return opts

    def fit(self, X: ImagesLike | None = None, y: Any = None, *, embeddings: np.ndarray | None = None) -> "RarityAudit":
        """Fit on images ``X`` (encoded by ``vae``) or on precomputed ``embeddings`` (n, d), one row per image."""
        if (X is None) == (embeddings is None):
            raise DebiasError("pass either images X or embeddings=, not both and not neither")
        features = None  # the contrastive encoder's, for knn-recon's third term
        if embeddings is not None:
            mu = _embeddings(embeddings)
            recon = np.zeros(len(mu))
            table = pd.DataFrame({"row": np.arange(len(mu))})
            name = self.estimator or "knn"
            if name in ("knn-recon", "recon"):
                raise DebiasError(f"estimator {name!r} needs a reconstruction error; embeddings have none (use knn)")
        else:
            if self.vae is None:
                raise DebiasError("RarityAudit needs a trained vae to encode images (or fit(embeddings=...))")
            data, enc = _encode(self.vae, X, self.batch_size)
            mu, recon, table = enc.mu, enc.recon_error, data.table
            name = self.estimator or DEFAULT_ESTIMATOR
            if self.encoder is not None and name == "knn-recon":
                features = embed_images(self.encoder, data, self.batch_size, AUDIT_EMBEDDING_READOUT)
        result = fit_audit_rarity(mu, recon, name, self._density(), self.n_neighbors, embeddings=features)
        self.from_embeddings_ = embeddings is not None
        self.estimator_ = result.fitted
        self.rarity_ = result.rarity
        self.weights_ = result.weights
        self.temperature_ = result.temperature
        self.scores_ = table.copy().assign(rarity=result.rarity, weight=result.weights, recon_error=recon)
        return self

    def _rarity(self, X: ImagesLike | None, embeddings: np.ndarray | None) -> np.ndarray:
        check_is_fitted(self, "rarity_")
        if embeddings is not None:
            if not self.from_embeddings_:
                raise DebiasError("this audit was fitted on images: score images, not embeddings")
            return rarity_of_new_rows(self.estimator_, _embeddings(embeddings), np.zeros(len(embeddings)))
        if self.from_embeddings_:
            raise DebiasError("this audit was fitted on embeddings: pass embeddings=")
        data, enc = _encode(self.vae, X, self.batch_size)
        uses_encoder = getattr(self.estimator_, "embedding_knn_", None) is not None
        features = embed_images(self.encoder, data, self.batch_size, AUDIT_EMBEDDING_READOUT) if uses_encoder else None
        return rarity_of_new_rows(self.estimator_, enc.mu, enc.recon_error, features)

    def score_samples(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Higher = more typical of the fitted set (minus the rarity), as in scikit-learn."""
        return -self._rarity(X, embeddings)

    def sampling_weights(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Sampling probabilities (sum to 1) for other images, at the temperature fitted on the training set."""
        return tempered_weights(self._rarity(X, embeddings), self.temperature_)


def _embeddings(embeddings: Any) -> np.ndarray:
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.ndim != 2 or len(arr) < 3 or not np.isfinite(arr).all():
        raise DebiasError(f"embeddings must be a finite (n, d) array with n >= 3, got shape {arr.shape}")
    return arr


class NoveltyDetector(OutlierMixin, BaseEstimator):
    """Is an image new to the model? A fitted novelty score with conformal calibration (what `debias score` and
    the service use), as a scikit-learn outlier detector.

    ``fit(X)`` encodes the images, fits the score on ``1 - calibration_fraction`` of them and calibrates the
    threshold on the rest, so that about ``target_fpr`` of new in-distribution images are called novel.
    ``score_samples`` is higher = more normal; ``decision_function`` = ``score_samples - offset_`` (< 0 = novel);
    ``predict`` gives +1 typical / -1 novel; ``p_values`` the conformal p-values (small = novel).

    ``encoder``: the run's contrastive encoder (:func:`load_encoder`); with it the score adds the kNN distance among
    its features (``embedding_knn``), which sees near-distribution images that the VAE's statistics miss, read out
    at ``embedding_readout`` ("max": the per-channel maximum of its last map; "avg", "avg+max").

    ``fit(embeddings=E)`` needs no model: the score is then the kNN distance among the embeddings (one-sided), with
    the same split and calibration; score new rows with ``embeddings=`` too.
    """

    def __init__(
        self,
        vae: ConvVAE | None = None,
        *,
        encoder: ContrastiveEncoder | None = None,
        embedding_readout: str = DEFAULT_EMBEDDING_READOUT,
        target_fpr: float = DEFAULT_TARGET_FPR,
        calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        self.vae = vae
        self.encoder = encoder
        self.embedding_readout = embedding_readout
        self.target_fpr = target_fpr
        self.calibration_fraction = calibration_fraction
        self.seed = seed
        self.batch_size = batch_size

    def fit(self, X: ImagesLike | None = None, y: Any = None, *, embeddings: np.ndarray | None = None) -> "NoveltyDetector":
        if (X is None) == (embeddings is None):
            raise DebiasError("pass either images X or embeddings=, not both and not neither")
        if embeddings is not None:
            self.detector_ = fit_embedding_detector(_embeddings(embeddings), target_fpr=self.target_fpr,
                                                    calibration_fraction=self.calibration_fraction, seed=self.seed)
        else:
            if self.vae is None:
                raise DebiasError("NoveltyDetector needs a trained vae to encode images (or fit(embeddings=...))")
            cfg = self.vae.config
            data = as_image_set(X, cfg.image_size, cfg.channels)
            self.detector_ = fit_detector(self.vae, data, calibration_fraction=self.calibration_fraction,
                                          target_fpr=self.target_fpr, encoder=self.encoder,
                                          embedding_readout=self.embedding_readout, seed=self.seed,
                                          batch_size=self.batch_size, progress=False)
        self.offset_ = -float(self.detector_.calibrator.threshold_)
        return self

    def _results(self, X: ImagesLike | None, embeddings: np.ndarray | None = None) -> Any:
        check_is_fitted(self, "detector_")
        if isinstance(self.detector_, EmbeddingDetector):
            if embeddings is None:
                raise DebiasError("this detector was fitted on embeddings: pass embeddings=")
            return self.detector_.score(_embeddings(embeddings))
        if embeddings is not None:
            raise DebiasError("this detector was fitted on images: score images, not embeddings")
        cfg = self.detector_.model.config
        return self.detector_.score_dataset(as_image_set(X, cfg.image_size, cfg.channels), progress=False,
                                            batch_size=self.batch_size)

    def score_samples(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Higher = more normal: minus the novelty score."""
        return -np.asarray(self._results(X, embeddings).novelty, dtype=np.float64)

    def decision_function(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """``score_samples - offset_``: negative = novel at the calibrated threshold."""
        return self.score_samples(X, embeddings=embeddings) - self.offset_

    def predict(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """+1 typical, -1 novel (the conformal decision at ``target_fpr``)."""
        return np.where(self._results(X, embeddings).is_novel, -1, 1)

    def p_values(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Conformal p-values: the share of calibration images at least as novel (small = novel)."""
        return np.asarray(self._results(X, embeddings).p_value, dtype=np.float64)

    def explain(self, X: ImagesLike | None = None, *, embeddings: np.ndarray | None = None) -> pd.DataFrame:
        """One row per image: novelty, p_value, is_novel and the statistic that drove the verdict."""
        res = self._results(X, embeddings)
        return pd.DataFrame([res.record(i) for i in range(len(res))])

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector (model weights included) to the folder ``path``: model.pt (+ the encoder's
        contrastive/encoder.pt) + novelty.pt."""
        check_is_fitted(self, "detector_")
        if isinstance(self.detector_, EmbeddingDetector):
            raise DebiasError("saving a detector fitted on embeddings is not supported; refit it from the embeddings")
        from debias.density.detector import save_detector_folder

        return save_detector_folder(self.detector_, Path(path))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "NoveltyDetector":
        """A detector saved by :meth:`save` (or any run directory with model.pt; fitted there when needed)."""
        from debias.density.detector import open_detector

        det = open_detector(path, device=device, progress=False)
        self = cls(det.model, encoder=det.encoder, target_fpr=det.calibrator.target_fpr)
        self.detector_ = det
        self.offset_ = -float(det.calibrator.threshold_)
        return self
