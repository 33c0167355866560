"""A small label-free contrastive image encoder (SimCLR, Chen et al., ICML 2020): the novelty score's second view.

Why a second model (issue 16): a VAE spends its latent space on what varies most among the training images, an
outline and a brightness, and smooths away what tells near classes apart. On Fashion-MNIST with one class held out
of training, kNN among the VAE's posteriors could not tell a T-shirt, a dress or a coat from the other garments
(AUROC 0.49-0.68); kNN among the features of this encoder, trained label-free on the same images, could (0.74-0.97;
docs/benchmarks.md). It is trained to give two random views of one image (a crop, a flip, a brightness and contrast
change) the same features and other images different ones, so its features keep what identifies an image and drop
what a crop or a flip changes. Neither view is enough alone: crops of a digit look like crops of a garment to it
(far pairs 0.85-0.89), which the VAE's pixel and reconstruction statistics catch; the detector combines both.

The network: five 3x3 convolutions (width, 2w, 2w, 4w, 4w channels; strides 1, 2, 1, 2, 1; batch norm), mean-pooled
to 4w features (the representation used for kNN, L2-normalised), and a two-layer projection head used only by the
loss (Chen et al. 2020, section 4.2: the layer before the head keeps more information). Images larger than
``max_input`` px are resized down to it first: the features need the shape, not the last pixel, and a 64-px input
would cost four times as much to train.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

READOUTS = ("avg", "max", "avg+max", "maps-avg", "maps-max")


@dataclass
class ContrastiveConfig:
    image_size: int = 64  # the size of the images it is given (the VAE's); resized to max_input inside when larger
    channels: int = 3  # 1 or 3
    width: int = 32  # channels of the first convolution; the features are 4 x width
    projection_dim: int = 64  # output of the projection head (the loss's space only)
    max_input: int = 32  # px the encoder computes at (images above it are area-resized down)
    temperature: float = 0.2  # of NT-Xent (Chen et al. 2020, Eq. 1)
    min_crop_area: float = 0.6  # random resized crops keep 60-100 % of the image's area
    jitter: float = 0.4  # contrast factor in 1 +- jitter, brightness shift in +- jitter / 2 (0: no jitter)
    # Weight of a second task beside NT-Xent: name the rotation (0, 90, 180, 270 degrees) of each view from its
    # features (Gidaris et al., ICLR 2018; as a novelty score: Golan & El-Yaniv, NeurIPS 2018, Hendrycks et al.,
    # NeurIPS 2019). 0 = none, and no rotation head (encoders trained before it load unchanged).
    rotation_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 512:
            raise ValueError(f"image_size must be between 8 and 512, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 1 <= self.width <= 256:
            raise ValueError(f"width must be between 1 and 256, got {self.width}")
        if not 8 <= self.max_input <= 512:
            raise ValueError(f"max_input must be between 8 and 512, got {self.max_input}")
        if not 0 < self.min_crop_area <= 1 or not 0 <= self.jitter < 1 or not self.temperature > 0:
            raise ValueError("min_crop_area must be in (0, 1], jitter in [0, 1) and temperature positive")
        if not self.rotation_weight >= 0:
            raise ValueError(f"rotation_weight must be >= 0, got {self.rotation_weight}")

    @property
    def input_size(self) -> int:
        return min(self.image_size, self.max_input)

    def feature_dim(self, readout: str = "avg") -> int:
        """Length of the features at ``readout`` (:meth:`ContrastiveEncoder.forward`): 4 x width for "avg" and "max",
        twice that for "avg+max", the five maps' 1 + 2 + 2 + 4 + 4 = 13 x width for "maps-avg" and "maps-max"."""
        return {"avg+max": 8, "maps-avg": 13, "maps-max": 13}.get(readout, 4) * self.width

    def to_dict(self) -> dict:
        return asdict(self)


class ContrastiveEncoder(nn.Module):
    """``forward(x)`` -> (B, 4 x width) L2-normalised features of (B, C, S, S) images in [0, 1]; ``project`` maps
    the unnormalised features to the loss's space."""

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        # (The mean over the map is taken in features(), not by a pooling layer: the readout may want the map.)
        self.body = nn.Sequential(
            *block(config.channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
            *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 1),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True), nn.Linear(4 * w, config.projection_dim))
        # Reads the same unnormalised features as the projection head; only with rotation_weight > 0.
        self.rotation_head = nn.Linear(4 * w, 4) if config.rotation_weight > 0 else None

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised features (the map's spatial mean, 4 x width) of images already at
        :attr:`ContrastiveConfig.input_size`: what the projection head and the loss read."""
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor, readout: str = "avg") -> torch.Tensor:
        """L2-normalised features: what kNN reads. ``readout``: how the last map becomes them, "avg" its spatial mean
        (what training uses), "max" its per-channel maximum (the novelty score's and the audit's), "avg+max" both
        (each normalised, concatenated, / sqrt 2), "maps-avg" / "maps-max" every block's map pooled. The readout
        needs no retraining."""
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        if readout.startswith("maps-"):
            return self._every_map(self.resize(x), readout)
        h = self.body(self.resize(x))
        if readout == "avg":
            return F.normalize(h.mean((2, 3)).float(), dim=1)
        # The maximum keeps where a channel fires most, not how much of the image it covers: a sneaker's sole and
        # toe among sandals and boots, whose means blend (issue 16, docs/benchmarks.md "Session 15").
        peak = F.normalize(h.amax((2, 3)).float(), dim=1)
        if readout == "max":
            return peak
        return torch.cat([F.normalize(h.mean((2, 3)).float(), dim=1), peak], dim=1) / math.sqrt(2.0)

    def rotation_surprise(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) the mean cross-entropy of naming each of the four rotations of each image (higher = the rotation is
        harder to name than on the training images: a shape the encoder has not learned which way up it is). Golan &
        El-Yaniv 2018's score with the four rotations only. Needs ``rotation_weight > 0``."""
        if self.rotation_head is None:
            raise ValueError("this encoder was trained without the rotation task (rotation_weight = 0)")
        x = self.resize(x)
        losses = [F.cross_entropy(self.rotation_head(self.features(torch.rot90(x, k, (2, 3)))).float(),
                                  torch.full((len(x),), k, device=x.device), reduction="none") for k in range(4)]
        return torch.stack(losses).mean(0)

    def _every_map(self, x: torch.Tensor, readout: str) -> torch.Tensor:
        """Each of the five blocks' maps pooled ("maps-avg": spatial mean, "maps-max": per-channel maximum), each
        L2-normalised, concatenated and / sqrt 5: the early maps keep the strokes and textures that the last one,
        trained to survive crops, lets go (13 x width features)."""
        pooled = []
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                p = x.amax((2, 3)) if readout == "maps-max" else x.mean((2, 3))
                pooled.append(F.normalize(p.float(), dim=1))
        return torch.cat(pooled, dim=1) / math.sqrt(len(pooled))


def random_views(x: torch.Tensor, config: ContrastiveConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image (SimCLR's augmentations, Chen et al. 2020, appendix A): a resized crop of
    ``min_crop_area``-100 % of the area at an aspect of 3/4-4/3, a horizontal flip half of the time, and a contrast
    and brightness change (brightness only where the image is not black, so a dark background stays dark). One
    ``affine_grid`` for the whole batch: crops, flips and resizing in one resampling."""
    n, device = x.shape[0], x.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(n, *shape).uniform_(low, high, generator=generator).to(device)

    side = uniform(config.min_crop_area, 1.0).sqrt()
    aspect = uniform(math.log(3 / 4), math.log(4 / 3)).exp().sqrt()
    sx, sy = (side * aspect).clamp(max=1.0), (side / aspect).clamp(max=1.0)  # a crop never reaches past the image
    flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = sx * flip, sy
    theta[:, 0, 2] = uniform(-1.0, 1.0) * (1 - sx).clamp_min(0)
    theta[:, 1, 2] = uniform(-1.0, 1.0) * (1 - sy).clamp_min(0)
    size = config.input_size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if config.jitter == 0:
        return out
    contrast = uniform(1 - config.jitter, 1 + config.jitter, 1, 1, 1)
    brightness = uniform(-config.jitter / 2, config.jitter / 2, 1, 1, 1)
    return (out * contrast + brightness * out.gt(0.02)).clamp_(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss (Chen et al. 2020, Eq. 1), averaged over the 2N views: each view must pick its partner out of
    the other 2N - 1 views by cosine similarity / temperature."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def supervised_contrastive(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al., NeurIPS 2020, Eq. 2, L_out): as NT-Xent, but every other view of the same class is a
    partner too; each view's loss is the mean, over its partners, of minus the log-probability of picking that partner
    out of the other 2N - 1 views. With one image per class it is NT-Xent. Features trained this way gather each class
    in its own region, so an image of a class that training never saw lies away from all of them: the strongest
    near-distribution detector of Sun et al. (ICML 2022) is kNN in these features."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    y = torch.cat([labels, labels])
    sim = (z @ z.T) / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    partners = (y[:, None] == y[None, :]) & ~self_mask  # never empty: the view of the same image is always there
    return -(log_prob.masked_fill(~partners, 0.0).sum(1) / partners.sum(1)).mean()


def contrastive_loss(
    model: ContrastiveEncoder, x: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """NT-Xent between two random views of each image of the batch (SupCon when class indices ``y`` are given), and
    its value for the log. The views are drawn from torch's global generator, which the training loop seeds per epoch
    and rank (a resumed run draws the same)."""
    cfg = model.config
    views = torch.cat([random_views(x, cfg), random_views(x, cfg)])
    turns = None
    if model.rotation_head is not None:
        # Both views of an image turned by the same quarter turns, after the crop and flip (a flip of a turned image
        # would look like the opposite turn): the pair stays a pair, and the turn is there to be named.
        turns = torch.randint(0, 4, (len(x),)).to(x.device).repeat(2)
        for k in range(1, 4):
            views[turns == k] = torch.rot90(views[turns == k], k, (2, 3))
    h = model.features(views)
    z = model.head(h)
    if y is None:
        loss = nt_xent(z[: len(x)], z[len(x) :], cfg.temperature)
    else:
        loss = supervised_contrastive(z[: len(x)], z[len(x) :], y, cfg.temperature)
    if turns is None:
        return loss, {"loss": float(loss.detach())}
    rotation = F.cross_entropy(model.rotation_head(h).float(), turns)
    total = loss + cfg.rotation_weight * rotation
    return total, {"loss": float(total.detach()), "nt_xent": float(loss.detach()), "rotation": float(rotation.detach())}
