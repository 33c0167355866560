"""How good are generated images? FID, KID, improved precision/recall and the classification accuracy score, all
measured with networks trained here on the same data: nothing is downloaded.

Feature space. FID and KID are usually computed on Inception-v3 activations, which would mean downloading ImageNet
weights. Here the features are the posterior mean mu(x) of a VAE trained by ``debias train`` on the real data
(:class:`VAEFeatures`). The posterior mean, rather than the encoder's penultimate activations (its flattened last
feature map: 256 x 4 x 4 = 4096 values at 64 px), because

- FID fits a Gaussian to each set: its covariance needs many more images than dimensions, and the per-group sets
  measured here have tens to hundreds of images. latent_dim (32 by default) is within reach; 4096 is not (the
  covariance would be singular and FID mostly estimation noise, and its d x d eigen-decomposition slow on a CPU);
- the KL term pulls every latent dimension towards N(0, 1), so the dimensions share one scale and Euclidean k-NN
  balls (precision/recall) and the polynomial kernel (KID) weigh them alike; raw activations have arbitrary
  per-channel scales;
- it is the space in which debias already defines rarity and novelty, so "the generator covers the rare group"
  means the same thing in the audit and here.

FID and KID are computed by torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with
``feature=`` a module); torchmetrics hands a custom module the update's tensors unchanged (its ``normalize=`` only
rescales for the built-in Inception), so the modules below take float images in [0, 1] (or uint8), NCHW, and carry a
``num_features`` attribute so torchmetrics does not probe them with a dummy 299 x 299 image. Features are float64:
KID sums cubes of dot products over all pairs of a subset, which float32 rounds visibly for near-identical sets.

torchmetrics 1.9 has no improved precision/recall, so :func:`precision_recall` (Kynkäänniemi et al., NeurIPS 2019)
is written here with chunked ``torch.cdist``.

Devices: everything runs where the feature module lives (CUDA when ``device="auto"`` finds one). Features are taken
in full precision, without the bfloat16 autocast the training loops use. The CUDA path is untested (no GPU here).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from debias.data import ImageSet
from debias.data.tensors import ImageTensor
from debias.models import ConvVAE, VAEConfig
from debias.runtime.device import resolve_device
from debias.runtime.distributed import DistContext
from debias.runtime.progress import progress_bar
from debias.training.classifier import (
    ClassifierTrainConfig,
    predict_proba,
    train_classifier,
)
from debias.training.sampling import Uniform
from debias.training.vae import encode_labels, load_model

__all__ = [
    "VAEFeatures",
    "PrecomputedFeatures",
    "load_feature_extractor",
    "extract_features",
    "FidKid",
    "fid_kid",
    "PrecisionRecall",
    "precision_recall",
    "CasConfig",
    "CasResult",
    "classification_accuracy_score",
    "KID_DEFAULT_SUBSET_SIZE",
]

KID_DEFAULT_SUBSET_SIZE = 1000  # torchmetrics' default; shrunk to the smaller set when a group has fewer images
KID_DEFAULT_SUBSETS = 100

# What the metric functions accept: an ImageSet, uint8 (N, H, W, C) pixels as the cache stores them, or a tensor
# that the feature module takes as is (float (N, C, H, W) images in [0, 1], or (N, D) features for
# PrecomputedFeatures).
Images = Union[ImageSet, np.ndarray, torch.Tensor]


# ------------------------------------------------------------------------------------------ feature modules
class VAEFeatures(nn.Module):
    """Images -> the VAE posterior mean mu(x), float64 (N, latent_dim): a torchmetrics feature module.

    Takes float images in [0, 1] or uint8 images in [0, 255], (N, C, H, W), any size (the encoder resizes) and 1 or
    3 channels (converted to the model's). The VAE stays in eval mode whatever ``train()`` is called with, as
    torchmetrics' own Inception wrapper does."""

    def __init__(self, model: ConvVAE) -> None:
        super().__init__()
        self.model = model.eval()
        self.num_features = model.config.latent_dim  # read by torchmetrics instead of probing with a dummy image

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def train(self, mode: bool = True) -> "VAEFeatures":
        return super().train(False)

    @torch.no_grad()  # not inference_mode: torchmetrics adds the output into its own (normal) state tensors
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        want = self.model.config.channels
        if x.shape[1] != want:
            # Greyscale <-> colour the way the data layer converts (ITU-R 601 luma for RGB -> L).
            if want == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mu, _, _ = self.model.encode(x)
        return mu.double()


class PrecomputedFeatures(nn.Module):
    """Identity on (N, D) features already extracted: lets :func:`fid_kid` reuse one encoding pass for many
    groups and for precision/recall, while FID and KID themselves are still torchmetrics'."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) features, got {tuple(features.shape)}")
        return features.double()


def load_feature_extractor(run_dir: str | Path, device: str = "auto") -> VAEFeatures:
    """The feature module of a ``debias train`` run (model.pt), on ``device``."""
    model, _ = load_model(run_dir, device=resolve_device(device))
    return VAEFeatures(model)


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """Slices of ``images`` in the form the feature modules take (see :data:`Images`)."""
    n = len(images)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if isinstance(images, ImageSet):
            yield images.batch(slice(start, stop))
        elif isinstance(images, np.ndarray):
            if images.ndim != 4 or images.dtype != np.uint8:
                raise ValueError(f"numpy images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
            yield torch.from_numpy(np.ascontiguousarray(images[start:stop])).permute(0, 3, 1, 2)
        else:
            yield images[start:stop]


def extract_features(
    images: Images, features: nn.Module, *, batch_size: int = 256, progress: bool = False, description: str = "features"
) -> torch.Tensor:
    """(N, D) float64 features of ``images`` (on the CPU), in batches."""
    out = []
    with progress_bar(description, total=len(images), enabled=progress) as bar:
        for x in _batches(images, batch_size):
            out.append(features(x).detach().double().cpu())
            bar.advance(len(x))
    if not out:
        return torch.zeros(0, int(getattr(features, "num_features", 0)), dtype=torch.float64)
    return torch.cat(out)


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------ FID and KID
@dataclass
class FidKid:
    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    kid_subset_size: int | None  # images per KID subset actually used
    n_real: int
    n_fake: int
    reason: str | None = None  # why a value is None


def fid_kid(
    real: Images,
    fake: Images,
    features: nn.Module,
    subset_size: int | None = None,
    *,
    subsets: int = KID_DEFAULT_SUBSETS,
    batch_size: int = 256,
    seed: int = 0,
) -> FidKid:
    """FID and KID (mean and standard deviation over ``subsets`` random subsets) of ``fake`` against ``real``,
    computed by torchmetrics on the features ``features`` gives.

    ``subset_size`` (KID's images per subset) defaults to min(1000, n_real, n_fake), so that small groups get a
    value instead of torchmetrics' "subset_size should be smaller than the number of samples"; a given one is
    capped the same way. With fewer than 2 images on either side neither metric is defined: both are None and
    ``reason`` says why. KID's subsets are drawn from a generator seeded with ``seed`` (the global RNG is left as it
    was), so the result is reproducible."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real), len(fake)
    if min(n_real, n_fake) < 2:
        return FidKid(None, None, None, None, n_real, n_fake,
                      reason=f"needs at least 2 real and 2 generated images (has {n_real} real, {n_fake} generated)")
    size = min(subset_size or KID_DEFAULT_SUBSET_SIZE, n_real, n_fake)
    device = _module_device(features)
    fid = FrechetInceptionDistance(feature=features, reset_real_features=True).to(device)
    with warnings.catch_warnings():  # "KID will save all extracted features": that is the point here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=size).to(device)
    # Each metric runs the feature module on every batch (torchmetrics has no way to share one pass between two
    # metrics); callers measuring many groups extract the features once and pass PrecomputedFeatures.
    for images, is_real in ((real, True), (fake, False)):
        for x in _batches(images, batch_size):
            x = x.to(device)
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets with torch.randperm on the global CPU RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return FidKid(
        fid=fid_value, kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=size,
        n_real=n_real, n_fake=n_fake,
    )


# ------------------------------------------------------------------------------------------ precision / recall
@dataclass
class PrecisionRecall:
    precision: float | None  # share of generated samples inside the real manifold
    recall: float | None  # share of real samples inside the generated manifold
    k: int
    n_real: int
    n_fake: int
    reason: str | None = None


_CDIST_ELEMENTS = 1 << 24  # distances held at once (128 MiB of float64)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself, at distance 0, is not counted)."""
    chunk = max(1, _CDIST_ELEMENTS // max(1, len(x)))
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        radii.append(d.kthvalue(k + 1, dim=1).values)  # position k+1: the self-distance 0 comes first
    return torch.cat(radii)


def _inside_fraction(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``queries`` within the radius of at least one centre (the union of k-NN balls)."""
    chunk = max(1, _CDIST_ELEMENTS // max(1, len(centres)))
    inside = 0
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], centres, compute_mode="donot_use_mm_for_euclid_dist")
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

    Each set's manifold is the union of balls around its points, each with the radius to the point's k-th nearest
    neighbour in the same set. Precision is the share of generated points inside the real manifold (are the images
    realistic?), recall the share of real points inside the generated manifold (is the variety covered?).
    Distances are computed exactly (no matrix-product shortcut, which blurs zero distances), in float64 and in
    chunks that bound memory. A set with k or fewer points has no k-th neighbour: its side is None, with a reason.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real = torch.as_tensor(real_feats).double()
    fake = torch.as_tensor(fake_feats).double().to(real.device)
    n_real, n_fake = len(real), len(fake)
    reasons = []
    precision = recall = None
    if n_real <= k or n_fake == 0:
        reasons.append(f"precision needs more than k={k} real and at least 1 generated image")
    else:
        precision = _inside_fraction(fake, real, _knn_radii(real, k))
    if n_fake <= k or n_real == 0:
        reasons.append(f"recall needs more than k={k} generated and at least 1 real image")
    else:
        recall = _inside_fraction(real, fake, _knn_radii(fake, k))
    return PrecisionRecall(precision, recall, k, n_real, n_fake, reason="; ".join(reasons) or None)


# ------------------------------------------------------------------------------------------ CAS
@dataclass
class CasConfig:
    """The classifier of the classification accuracy score: the ConvVAE encoder and its class head (the network
    every ``debias train-classifier`` method trains), cross-entropy, uniform sampling, the last epoch kept."""

    epochs: int = 10  # small synthetic sets need them: 150 images reach 97 % at 8 epochs, 50 % at 5 (tests)
    batch_size: int = 64
    lr: float = 1e-3
    latent_dim: int = 16
    width: int = 16
    seed: int = 0
    device: str = "auto"


@dataclass
class CasResult:
    accuracy: float | None  # on all real images
    per_group: dict[str, dict[str, float | int]] = field(default_factory=dict)  # group -> {"accuracy", "n"}
    n_train: int = 0
    n_test: int = 0
    classes: list[str] = field(default_factory=list)
    missing_classes: list[str] = field(default_factory=list)  # real labels with no synthetic image: never predicted
    reason: str | None = None


def classification_accuracy_score(
    synthetic: ImageSet,
    synthetic_labels: np.ndarray,
    real: ImageSet,
    real_labels: np.ndarray,
    groups: np.ndarray | None = None,
    config: CasConfig | None = None,
    *,
    progress: bool = False,
) -> CasResult:
    """Classification accuracy score (Ravuri & Vinyals, 2019): train a classifier on the synthetic images and their
    labels only, then measure its accuracy on the real images. High when the generated images carry the features
    that tell the classes apart in real data; ``groups`` (one value per real image) splits the accuracy by group.

    Labels are compared as strings. Real labels that no synthetic image has get a logit nonetheless (so the real
    rows can be scored) but the classifier never sees them: those rows count as errors, and ``missing_classes``
    lists them."""
    cfg = config or CasConfig()
    syn_str = np.asarray(synthetic_labels).astype(str)
    real_str = np.asarray(real_labels).astype(str)
    trained_on = sorted(set(syn_str.tolist()))
    if len(trained_on) < 2:
        return CasResult(None, n_train=len(syn_str), n_test=len(real_str), classes=trained_on,
                         reason=f"the synthetic images have {len(trained_on)} label value(s); a classifier needs 2")
    if len(real_str) == 0:
        return CasResult(None, n_train=len(syn_str), classes=trained_on, reason="no real images to test on")
    classes = sorted(set(trained_on) | set(real_str.tolist()))
    y_syn = encode_labels(pd.Series(syn_str), classes)[0].copy()  # a writable copy: torch.as_tensor warns otherwise
    y_real = encode_labels(pd.Series(real_str), classes)[0]
    model_config = VAEConfig(
        image_size=synthetic.image_size, channels=synthetic.channels, latent_dim=cfg.latent_dim, width=cfg.width,
        n_classes=len(classes), classes=classes,
    )
    train_config = ClassifierTrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=cfg.device, objective="ce",
        select="last",  # no validation rows: real images must not choose the epoch, synthetic ones say little
    )
    train_images = ImageTensor(synthetic)
    # The classifier is a by-product: its checkpoints go to a scratch folder that is removed afterwards.
    with tempfile.TemporaryDirectory(prefix="debias-cas-") as tmp:
        trained = train_classifier(
            model_config, train_config, train_images, y_syn, Uniform(len(train_images)), Path(tmp),
            meta={"purpose": "classification accuracy score", "synthetic": synthetic.fingerprint},
            progress=progress, description="CAS ",
            # Single-process even under torchrun: only rank 0 measures quality, the other ranks have left by now.
            ctx=DistContext(device=resolve_device(cfg.device)),
        )
        pred = predict_proba(trained.model, ImageTensor(real)).argmax(1)
    correct = pred == y_real
    per_group: dict[str, dict[str, float | int]] = {}
    if groups is not None:
        g = np.asarray(groups).astype(str)
        for value in sorted(set(g.tolist())):
            mask = g == value
            per_group[value] = {"accuracy": float(correct[mask].mean()), "n": int(mask.sum())}
    return CasResult(
        accuracy=float(correct.mean()), per_group=per_group, n_train=len(y_syn), n_test=len(y_real),
        classes=classes, missing_classes=sorted(set(classes) - set(trained_on)),
    )


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe number: NaN and infinities become None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def as_dict(result: FidKid | PrecisionRecall | CasResult) -> Mapping[str, object]:
    """A result as a JSON-safe dict."""
    from dataclasses import asdict

    out = asdict(result)
    return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}
