"""A trained VAE plus its fitted novelty scorer and conformal calibration: everything `debias score` and the
service need to turn images into novelty, p-value, is_novel, rarity and an explanation.

The fitted part is stored next to the model as ``RUN_DIR/novelty.pt`` (tensors, numbers, strings, lists and dicts
only, loaded with ``weights_only=True``). It records the SHA-256 of the ``model.pt`` it was fitted for and is refitted
when the model changes. Fitting encodes the model's training data (or ``fit_data``), splits it at random into a fit
part (the statistics' distribution) and a calibration part (held-out scores for the conformal p-values).

The calibration part is held out from the scorer, not from the VAE: `debias train` trains on all of its data, so the
calibration images' reconstruction errors are slightly optimistic and the realised false-positive rate on new
in-distribution images can sit a little above the target (measured in docs/benchmarks.md). ``fit_data`` with images
the model never saw removes that bias.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from debias import __version__
from debias.data import ImageSet, load_images
from debias.data.splits import DEFAULT_CALIBRATION_FRACTION, calibration_split
from debias.density.calibration import ConformalCalibrator
from debias.density.encoding import Encoded, encode_batch, encode_images
from debias.density.estimators import LatentHistogramDensity
from debias.density.novelty import (
    DEFAULT_EMBEDDING_READOUT,
    DEFAULT_STATISTICS,
    DEFAULT_STATISTICS_WITH_EMBEDDING,
    DEFAULT_WEIGHTS_WITH_EMBEDDING,
    EMBEDDING_STATISTICS,
    PIXEL_STATISTICS,
    NoveltyScorer,
    PixelDensity,
    feature_matrix,
)
from debias.errors import DebiasError
from debias.models import ConvVAE
from debias.models.contrastive import ContrastiveEncoder
from debias.runtime.checkpoint import load_checkpoint, save_checkpoint
from debias.runtime.device import autocast
from debias.training.contrastive import encoder_path, load_encoder
from debias.training.vae import MODEL, load_model

NOVELTY_FILE = "novelty.pt"
# 4: + embedding_knn when the run has a contrastive encoder (issue 16); 3: + pixel_density, fisher; 2: posterior_knn +
# recon_error, l1; 1: mahalanobis of five statistics. A file of another format is refitted, not read.
FORMAT_VERSION = 4
DEFAULT_TARGET_FPR = 0.05


# -- results -----------------------------------------------------------------------------------------------------
@dataclass
class NoveltyResults:
    """Per-image outputs, row i for image i."""

    novelty: np.ndarray  # higher = more novel (the scorer's combined statistic)
    p_value: np.ndarray  # conformal p-value against the calibration images
    is_novel: np.ndarray  # p_value <= target_fpr
    rarity: np.ndarray  # the audit's rarity: minus the latent-histogram log density
    recon_error: np.ndarray
    top_dims: list[list[dict[str, float | int]]]
    driver: list[str] = field(default_factory=list)  # the statistic that drove each image's novelty
    statistics: list[dict[str, float]] = field(default_factory=list)  # each statistic's standardised value
    recon: torch.Tensor | None = field(default=None, repr=False)  # reconstructions (CPU), when asked for
    images: torch.Tensor | None = field(default=None, repr=False)  # the model's inputs (CPU), with ``recon``

    def __len__(self) -> int:
        return len(self.novelty)

    def record(self, i: int) -> dict[str, Any]:
        return {
            "novelty": float(self.novelty[i]),
            "p_value": float(self.p_value[i]),
            "is_novel": bool(self.is_novel[i]),
            "rarity": float(self.rarity[i]),
            "recon_error": float(self.recon_error[i]),
            "driver": self.driver[i],
            "statistics": self.statistics[i],
            "top_dims": self.top_dims[i],
        }


# -- the detector ------------------------------------------------------------------------------------------------
class FittedDetector:
    """Model + fitted :class:`NoveltyScorer` + :class:`ConformalCalibrator`, and a card describing them; with a
    :class:`PixelDensity` when the scorer reads the pixel column (the default statistics do), and the run's
    :class:`~debias.models.contrastive.ContrastiveEncoder` when the scorer reads embeddings (``embedding_knn``)."""

    def __init__(
        self,
        model: ConvVAE,
        scorer: NoveltyScorer,
        calibrator: ConformalCalibrator,
        card: dict[str, Any],
        pixel_density: PixelDensity | None = None,
        encoder: ContrastiveEncoder | None = None,
        embedding_readout: str = DEFAULT_EMBEDDING_READOUT,
    ) -> None:
        self.model = model
        self.scorer = scorer
        self.calibrator = calibrator
        self.card = card
        self.pixel_density = pixel_density
        self.encoder = encoder
        self.embedding_readout = embedding_readout  # how embedding_knn reads the encoder (fitted and scored alike)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def channels(self) -> int:
        return self.model.config.channels

    def with_target_fpr(self, target_fpr: float) -> "FittedDetector":
        """The same detector deciding at another false-positive rate (recomputed from the stored scores)."""
        cal = ConformalCalibrator(target_fpr=target_fpr).fit(self.calibrator.scores_)
        card = {**self.card, "target_fpr": cal.target_fpr, "threshold": _finite_or_none(cal.threshold_)}
        return FittedDetector(self.model, self.scorer, cal, card, self.pixel_density, self.encoder,
                              self.embedding_readout)

    def pixel_scores(self, x: torch.Tensor) -> np.ndarray | None:
        """The pixel column of the feature matrix for (B, C, S, S) images in [0, 1], or None without one."""
        return self.pixel_density.score_samples(x) if self.pixel_density is not None else None

    def embeddings(self, x: torch.Tensor) -> np.ndarray | None:
        """The contrastive encoder's features of (B, C, S, S) images in [0, 1], or None without an encoder."""
        return encoder_features(self.encoder, x, self.embedding_readout) if self.encoder is not None else None

    def score_encoded(
        self, enc: Encoded, pixel: np.ndarray | None = None, *, embeddings: np.ndarray | None = None, top_k: int = 5
    ) -> NoveltyResults:
        """Results from encodings (and the images' :meth:`pixel_scores` and :meth:`embeddings`, when the detector has
        a pixel density and an encoder)."""
        X = feature_matrix(enc, pixel)
        out = self.scorer.analyse(X, k=top_k, embeddings=embeddings)  # one neighbour search for score and explanation
        return NoveltyResults(
            novelty=out["novelty"],
            p_value=self.calibrator.p_values(out["novelty"]),
            is_novel=self.calibrator.is_novel(out["novelty"]),
            rarity=self.scorer.rarity(X),
            recon_error=enc.recon_error,
            top_dims=out["top_dims"],
            driver=out["driver"],
            statistics=out["statistics"],
        )

    def score_batch(self, x: torch.Tensor, *, top_k: int = 5, keep_recon: bool = False) -> NoveltyResults:
        """(B, C, S, S) float images in [0, 1] (already at the model's size) -> results."""
        enc, recon = encode_batch(self.model, x)
        res = self.score_encoded(enc, self.pixel_scores(x), embeddings=self.embeddings(x), top_k=top_k)
        if keep_recon:
            res.recon, res.images = recon, x.float().cpu()
        return res

    def score_dataset(
        self, data: ImageSet, *, top_k: int = 5, batch_size: int = 256, progress: bool = True
    ) -> NoveltyResults:
        enc = encode_images(self.model, data, batch_size=batch_size, progress=progress)
        pixel = _pixel_scores(self.pixel_density, data, batch_size) if self.pixel_density is not None else None
        emb = (embed_images(self.encoder, data, batch_size, self.embedding_readout)
               if self.encoder is not None else None)
        return self.score_encoded(enc, pixel, embeddings=emb, top_k=top_k)

    # -- persistence -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path, model_sha256: str, encoder_sha256: str | None = None) -> None:
        save_checkpoint(
            {
                "format": FORMAT_VERSION,
                "model_sha256": model_sha256,
                "encoder_sha256": encoder_sha256,
                "embedding_readout": self.embedding_readout,
                "scorer": _pack(self.scorer),
                "calibrator": _pack(self.calibrator),
                "pixel_density": _pack(self.pixel_density),
                "card": self.card,
            },
            path,
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fit_detector(
    model: ConvVAE,
    data: ImageSet,
    *,
    meta: dict[str, Any] | None = None,
    model_sha256: str = "",
    encoder_sha256: str = "",
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION,
    target_fpr: float = DEFAULT_TARGET_FPR,
    scorer: NoveltyScorer | None = None,
    encoder: ContrastiveEncoder | None = None,
    embedding_readout: str = DEFAULT_EMBEDDING_READOUT,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
) -> FittedDetector:
    """Encode ``data``, fit the scorer on a random ``1 - calibration_fraction`` of it and calibrate on the rest.
    With a contrastive ``encoder`` the default scorer adds ``embedding_knn`` (kNN among its features, read out at
    ``embedding_readout``) to the default statistics."""
    n = len(data)
    try:
        fit_rows, cal_rows = calibration_split(n, calibration_fraction, seed)
    except ValueError as exc:
        raise DebiasError(f"{exc}: need at least 3 images and a fraction in (0, 1)") from None
    t0 = time.perf_counter()
    enc = encode_images(model, data, batch_size=batch_size, progress=progress, description="encoding (novelty fit)")
    if scorer is None:
        scorer = (NoveltyScorer(statistics=DEFAULT_STATISTICS_WITH_EMBEDDING, weights=DEFAULT_WEIGHTS_WITH_EMBEDDING)
                  if encoder is not None else NoveltyScorer(statistics=DEFAULT_STATISTICS))
    uses_embeddings = bool(EMBEDDING_STATISTICS & set(scorer.statistics))
    if uses_embeddings and encoder is None:
        raise DebiasError("the novelty statistic embedding_knn needs a contrastive encoder (debias train trains one)")
    # an unread encoder is not kept
    emb = embed_images(encoder, data, batch_size, embedding_readout) if uses_embeddings else None
    pixel_density, pixel = None, None
    if PIXEL_STATISTICS & set(scorer.statistics):
        # Fitted on the fit part only, like the scorer: the calibration images must be new to everything that was
        # fitted, or their p-values would not be exchangeable with those of new images.
        pixel_density = PixelDensity()
        for a in range(0, len(fit_rows), batch_size):
            pixel_density.partial_fit(data.batch(np.sort(fit_rows[a : a + batch_size])))
        pixel = _pixel_scores(pixel_density, data, batch_size)
    X = feature_matrix(enc, pixel)
    scorer.fit(X[fit_rows], embeddings=None if emb is None else emb[fit_rows])
    calibrator = ConformalCalibrator(target_fpr=target_fpr).fit(
        scorer.novelty(X[cal_rows], embeddings=None if emb is None else emb[cal_rows]))
    cfg = model.config
    meta = meta or {}
    card = {
        "debias_version": __version__,
        "model_sha256": model_sha256[:16],
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "latent_dim": cfg.latent_dim,
        "trained_on": meta.get("data", {}),
        "novelty": {
            "statistics": list(scorer.statistics),
            "combine": scorer.combine,
            "one_sided": list(scorer.one_sided),
            "weights": dict(scorer.weights or {}),
            "n_neighbors": scorer.n_neighbors,
            "pixel_bins": pixel_density.bins if pixel_density is not None else None,
            "embedding": None if emb is None else {
                "encoder": "contrastive (SimCLR)", "features": int(emb.shape[1]), "input_size": encoder.config.input_size,
                "readout": embedding_readout, "encoder_sha256": encoder_sha256[:16]},
            "knn_references": int(len(scorer.reference_)),
            "bins": scorer.bins,
            "alpha": scorer.alpha,
        },
        "fitted_on": {
            "source": data.source,
            "fingerprint": data.fingerprint,
            "n_images": n,
            "n_fit": int(len(fit_rows)),
            "seed": seed,
        },
        "calibration_size": calibrator.n_calibration_,
        "target_fpr": target_fpr,
        "threshold": _finite_or_none(calibrator.threshold_),
        "fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fit_seconds": round(time.perf_counter() - t0, 2),
    }
    return FittedDetector(model, scorer, calibrator, card, pixel_density, encoder if emb is not None else None,
                          embedding_readout)


def open_detector(
    run_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    fit_data: str | None = None,
    fit_where: list[str] | None = None,
    refit: bool = False,
    target_fpr: float | None = None,
    embedding_readout: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> FittedDetector:
    """The detector of a run: ``RUN_DIR/novelty.pt`` when it matches ``model.pt`` (and the run's contrastive encoder,
    ``RUN_DIR/contrastive/encoder.pt``, when it has one), else fitted now (on ``fit_data``, default the model's
    training data) and saved there. ``target_fpr`` overrides the stored one for this use only. ``embedding_readout``:
    how a new fit reads the encoder (default :data:`DEFAULT_EMBEDDING_READOUT`); a stored file read out otherwise is
    refitted when it is given, kept when not."""
    run = Path(run_dir)
    model, meta = load_model(run, device)
    model_path = run / MODEL if run.is_dir() else run
    sha = file_sha256(model_path)
    encoder, encoder_sha = None, None
    if (encoder_file := encoder_path(model_path.parent)).exists():
        encoder, _ = load_encoder(encoder_file, device)
        encoder_sha = file_sha256(encoder_file)
    path = model_path.parent / NOVELTY_FILE
    det: FittedDetector | None = None
    if path.exists() and not refit and fit_data is None:
        det = _load(path, model, sha, encoder, encoder_sha)
        if det is not None and embedding_readout not in (None, det.embedding_readout) and det.encoder is not None:
            det = None
    if det is None:
        data = _fit_source(model, meta, fit_data, fit_where, progress)
        split = {}
        trained = meta.get("data", {})
        if fit_data is None and trained.get("calibration_fraction", 0) > 0:
            if data.fingerprint == trained.get("fingerprint"):
                # the rows `debias train` held out of the model's training: calibrate on exactly those
                split = {"calibration_fraction": trained["calibration_fraction"], "seed": trained["calibration_seed"]}
            elif progress:
                print("warning: the model's training data changed since training; calibrating on a random part of it "
                      "(the model may have seen those images)", file=sys.stderr)
        det = fit_detector(
            model, data, meta=meta, model_sha256=sha, encoder_sha256=encoder_sha or "",
            target_fpr=target_fpr or DEFAULT_TARGET_FPR, encoder=encoder,
            embedding_readout=embedding_readout or DEFAULT_EMBEDDING_READOUT, batch_size=batch_size, progress=progress,
            **split,
        )
        det.card["calibration_held_out_of_training"] = bool(split)
        det.card["fitted_on"]["where"] = list((fit_where or []) if fit_data is not None else meta["data"].get("where", []))
        det.save(path, sha, encoder_sha)
    det.card["run"] = model_path.parent.name
    if target_fpr is not None and target_fpr != det.calibrator.target_fpr:
        det = det.with_target_fpr(target_fpr)
    return det


def _fit_source(
    model: ConvVAE, meta: dict[str, Any], fit_data: str | None, fit_where: list[str] | None, progress: bool
) -> ImageSet:
    cfg = model.config
    if fit_data is None:
        trained = meta.get("data", {})
        fit_data, fit_where = trained.get("source"), list(trained.get("where", []))
        if not fit_data:
            raise DebiasError("the model does not record its training data; pass the data to fit the novelty scorer on")
        try:
            return load_images(fit_data, where=fit_where, image_size=cfg.image_size, channels=cfg.channels, progress=progress)
        except DebiasError as exc:
            raise DebiasError(
                f"cannot fit the novelty scorer on the model's training data {fit_data!r} ({exc}); "
                "pass --fit-data SOURCE with in-distribution images"
            ) from None
    return load_images(fit_data, where=fit_where or [], image_size=cfg.image_size, channels=cfg.channels, progress=progress)


def _load(
    path: Path, model: ConvVAE, sha: str, encoder: ContrastiveEncoder | None, encoder_sha: str | None
) -> FittedDetector | None:
    """The stored detector, or None when it belongs to another model or encoder file (or to none where the run now
    has one), or to an older format: then it is refitted."""
    blob = load_checkpoint(path)
    if blob.get("format") != FORMAT_VERSION or blob.get("model_sha256") != sha:
        return None
    if blob.get("encoder_sha256") != encoder_sha:
        return None
    try:
        scorer = _unpack(blob["scorer"])
        calibrator = _unpack(blob["calibrator"])
        pixel_density = _unpack(blob.get("pixel_density"))
    except (KeyError, TypeError, ValueError) as exc:
        raise DebiasError(f"cannot load {path}: {exc}; delete it (or pass --refit) to fit the scorer again") from None
    if (not isinstance(scorer, NoveltyScorer) or not isinstance(calibrator, ConformalCalibrator)
            or not isinstance(pixel_density, (PixelDensity, type(None)))):
        raise DebiasError(f"cannot load {path}: unexpected contents; delete it (or pass --refit) to fit again")
    uses_encoder = bool(EMBEDDING_STATISTICS & set(scorer.statistics))
    # A file fitted before the readout was stored was fitted on the features' mean: it keeps reading that.
    return FittedDetector(model, scorer, calibrator, dict(blob["card"]), pixel_density, encoder if uses_encoder else None,
                          blob.get("embedding_readout", "avg"))


@torch.inference_mode()
def encoder_features(encoder: ContrastiveEncoder, x: torch.Tensor, readout: str = "avg") -> np.ndarray:
    """(B, e) float32 L2-normalised features of (B, C, S, S) images in [0, 1] at ``readout``
    (:meth:`~debias.models.contrastive.ContrastiveEncoder.forward`), on the encoder's device and precision (as the
    VAE's encoding: :func:`debias.runtime.device.autocast`)."""
    device = next(encoder.parameters()).device
    with autocast(device):
        return encoder(x.to(device, non_blocking=True), readout).float().cpu().numpy()


def _over_batches(per_batch: Callable[[torch.Tensor], np.ndarray], data: ImageSet, batch_size: int) -> np.ndarray:
    """``per_batch`` of every image of ``data``, a batch at a time (bounded memory), concatenated."""
    return np.concatenate([per_batch(data.batch(slice(a, a + batch_size))) for a in range(0, len(data), batch_size)])


def embed_images(
    encoder: ContrastiveEncoder, data: ImageSet, batch_size: int = 256, readout: str = "avg"
) -> np.ndarray:
    """:func:`encoder_features` of every image of ``data`` (n, e), a batch at a time: what the novelty score and the
    audit read from a run's contrastive encoder."""
    return _over_batches(lambda x: encoder_features(encoder, x, readout), data, batch_size)


def _pixel_scores(density: PixelDensity, data: ImageSet, batch_size: int) -> np.ndarray:
    """:meth:`PixelDensity.score_samples` of every image of ``data``."""
    return _over_batches(density.score_samples, data, batch_size)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# -- estimator state <-> weights_only-loadable containers ---------------------------------------------------------
# Only these classes can be rebuilt from a file: a name outside the list is an error, never an import.
_ESTIMATORS: dict[str, type] = {
    "NoveltyScorer": NoveltyScorer,
    "ConformalCalibrator": ConformalCalibrator,
    "PixelDensity": PixelDensity,
    "LatentHistogramDensity": LatentHistogramDensity,
}


#: Attributes that are caches rebuilt on first use (the kNN search's reference norms, the histogram tail tables):
#: derived from the fitted state, so never stored.
_CACHES = frozenset({"_reference_cache", "_tail_cache", "_tail_cache_of"})


def _pack(value: Any) -> Any:
    if type(value).__name__ in _ESTIMATORS and isinstance(value, _ESTIMATORS[type(value).__name__]):
        state = {k: _pack(v) for k, v in vars(value).items() if k not in _CACHES}
        return {"__estimator__": type(value).__name__, "state": state}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_pack(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _pack(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in {NOVELTY_FILE}")


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return value["__ndarray__"].numpy()
        if "__estimator__" in value:
            cls = _ESTIMATORS.get(value["__estimator__"])
            if cls is None:
                raise ValueError(f"unknown estimator {value['__estimator__']!r}")
            obj = cls.__new__(cls)
            obj.__dict__.update({k: _unpack(v) for k, v in value["state"].items()})
            return obj
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


def save_detector_folder(det: FittedDetector, folder: Path) -> Path:
    """``folder/model.pt`` (the detector's model, loadable by `debias score` and the service), its contrastive
    encoder when it has one (``folder/contrastive/encoder.pt``) and ``folder/novelty.pt`` (the fitted score and
    calibration, bound to both by their hashes). Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL
    save_checkpoint(
        {
            "model": det.model.state_dict(),
            "model_config": det.model.config.to_dict(),
            "data": det.card.get("trained_on", {}),
            "history": [],
            "version": __version__,
        },
        model_path,
    )
    sha = file_sha256(model_path)
    det.card["model_sha256"] = sha[:16]
    encoder_sha = None
    if det.encoder is not None:
        path = encoder_path(folder)
        path.parent.mkdir(exist_ok=True)
        save_checkpoint({"model": det.encoder.state_dict(), "model_config": det.encoder.config.to_dict(),
                         "history": [], "version": __version__}, path)
        encoder_sha = file_sha256(path)
    elif encoder_path(folder).exists():  # an earlier detector's encoder would be read beside this one
        encoder_path(folder).unlink()
    det.save(folder / NOVELTY_FILE, sha, encoder_sha)
    return folder


class EmbeddingDetector:
    """A novelty score over precomputed embeddings (no model): the one-sided kNN distance among them (the
    ``posterior_knn`` statistic with zero log-variances), calibrated conformally like :class:`FittedDetector`."""

    def __init__(self, scorer: NoveltyScorer, calibrator: ConformalCalibrator) -> None:
        self.scorer = scorer
        self.calibrator = calibrator

    @staticmethod
    def features(embeddings: np.ndarray) -> np.ndarray:
        e = np.asarray(embeddings, dtype=np.float64)
        return feature_matrix(Encoded(mu=e, logvar=np.zeros_like(e), recon_error=np.zeros(len(e)), logits=None))

    def score(self, embeddings: np.ndarray) -> NoveltyResults:
        X = self.features(embeddings)
        out = self.scorer.analyse(X)
        return NoveltyResults(
            novelty=out["novelty"], p_value=self.calibrator.p_values(out["novelty"]),
            is_novel=self.calibrator.is_novel(out["novelty"]), rarity=self.scorer.rarity(X),
            recon_error=np.zeros(len(X)), top_dims=out["top_dims"], driver=out["driver"],
            statistics=out["statistics"],
        )


def fit_embedding_detector(
    embeddings: np.ndarray, *, target_fpr: float = DEFAULT_TARGET_FPR,
    calibration_fraction: float = DEFAULT_CALIBRATION_FRACTION, seed: int = 0,
) -> EmbeddingDetector:
    """Fit the kNN score on a random ``1 - calibration_fraction`` of the rows and calibrate on the rest."""
    try:
        fit_rows, cal_rows = calibration_split(len(embeddings), calibration_fraction, seed)
    except ValueError as exc:
        raise DebiasError(str(exc).replace("images", "embeddings")) from None
    X = EmbeddingDetector.features(embeddings)
    scorer = NoveltyScorer(statistics=("posterior_knn",), one_sided=("posterior_knn",)).fit(X[fit_rows])
    calibrator = ConformalCalibrator(target_fpr=target_fpr).fit(scorer.novelty(X[cal_rows]))
    return EmbeddingDetector(scorer, calibrator)
