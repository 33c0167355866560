"""Convolutional beta-VAE, and DB-VAE when it has a classification head (Amini et al., AIES 2019).

One model for both: with ``n_classes == 0`` it is a plain beta-VAE (Higgins et al. 2017); with ``n_classes > 0``
the encoder also outputs class logits from the same features, as in DB-VAE, and the VAE part of the loss is applied
only to the samples of the class of interest (or to all samples).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ENCODERS = ("conv", "local")


@dataclass
class VAEConfig:
    image_size: int = 64  # 28..128 px, square
    channels: int = 3  # 1 or 3
    latent_dim: int = 32
    beta: float = 1.0  # weight of the KL term (beta-VAE)
    width: int = 32  # channels after the first convolution; doubled per stage, capped at 256
    n_classes: int = 0  # > 0 turns on the DB-VAE classification head
    classes: list[str] = field(default_factory=list)  # label value of each logit, in order
    vae_class: int | None = None  # DB-VAE: index of the class the VAE loss is applied to; None = all samples
    # "conv": strided convolutions down to 4x4 (the whole image is seen). "local": two 3x3 convolutions (receptive
    # field 5 px) with 2 x width channels, pooled over the image by mean and max: it can read colour, texture,
    # sharpness and small marks but not the layout of a face (see ConvVAE).
    encoder: str = "conv"

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if not 28 <= self.image_size <= 128:
            raise ValueError(f"image_size must be between 28 and 128, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError("latent_dim must be positive")
        if self.n_classes == 1:
            raise ValueError("a classification head needs at least 2 classes")

    @property
    def stages(self) -> int:
        # Down-sample by 2 until the feature map is 4x4; sizes that are not 4 * 2^k are resized to the next one up.
        return max(1, math.ceil(math.log2(self.image_size / 4)))

    @property
    def internal_size(self) -> int:
        return 4 * 2**self.stages

    def to_dict(self) -> dict:
        return asdict(self)


def _widths(config: VAEConfig) -> list[int]:
    return [min(config.width * 2**i, 256) for i in range(config.stages)]


class MeanMaxPool(nn.Module):
    """(B, C, H, W) -> (B, 2C): each channel's mean and maximum over the image (a mark anywhere counts)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


class ConvVAE(nn.Module):
    """The VAE (and, with ``n_classes``, the classifier every ``--reweight`` method trains).

    ``encoder="local"`` swaps the encoder for a small-receptive-field one, a "bag of local features" (BagNet, Brendel
    & Bethge 2019; ReBias, Bahng et al. 2020, use such models as the biased model): it sees 5 x 5 px at a time, so
    colour casts, blur, texture and small marks are easy for it and the layout of a face is not. Trained with the
    generalized cross-entropy it learns the shortcut and fails the rows without it, which is what the first model of
    the ``auto``, ``lff`` and ``rarity`` methods needs (issue 12: on the blur protocol the full-image first model also
    failed a fifth of the sharp male faces; this one fails 4 %). The decoder is unchanged and unused then.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        widths = _widths(config)

        enc: list[nn.Module] = []
        c_in = config.channels
        if config.encoder == "local":
            w = 2 * config.width
            # stride 2 in the second layer: a quarter of its cost, the receptive field stays 5 px
            enc = [nn.Conv2d(c_in, w, 3, 1, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 2, 1), nn.ReLU(), MeanMaxPool()]
            self.encoder = nn.Sequential(*enc)
            feat = 2 * w
        else:
            for w in widths:
                enc += [nn.Conv2d(c_in, w, 4, 2, 1), nn.SiLU()]
                c_in = w
            self.encoder = nn.Sequential(*enc, nn.Flatten())
            feat = widths[-1] * 4 * 4
        # One linear layer reads out mu, logvar and (DB-VAE) the class logits from the same features.
        self.head = nn.Linear(feat, 2 * config.latent_dim + config.n_classes)

        self.decoder_in = nn.Linear(config.latent_dim, feat)
        dec: list[nn.Module] = []
        rev = widths[::-1]
        for w_in, w_out in zip(rev, rev[1:] + [rev[-1]]):
            dec += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.SiLU()]
        dec += [nn.Conv2d(rev[-1], config.channels, 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, C, S, S) -> the encoder's last hidden features, the input of the head."""
        s = self.config.internal_size
        if x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images in [0, 1], (B, C, S, S) -> mu, logvar, class logits (None without a head)."""
        out = self.head(self.features(x))
        d = self.config.latent_dim
        mu, logvar = out[:, :d], out[:, d : 2 * d]
        logits = out[:, 2 * d :] if self.config.n_classes else None
        return mu, logvar.clamp(-12.0, 8.0), logits

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> reconstruction logits (B, C, S, S); sigmoid gives pixel values."""
        w = _widths(self.config)[-1]
        h = self.decoder(self.decoder_in(z).view(-1, w, 4, 4))
        s = self.config.image_size
        if h.shape[-1] != s:
            h = F.interpolate(h, size=(s, s), mode="bilinear", align_corners=False)
        return h

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        # z = mu + sigma * eps with sigma = exp(0.5 * logvar): logvar is log sigma^2 (the public lab's exp(logvar)
        # would sample with the variance in place of the standard deviation).
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    @torch.inference_mode()
    def sample_prior(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images decoded from z ~ N(0, I), pixel values in [0, 1]."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, generator=g).to(self.head.weight.device)
        return torch.sigmoid(self.decode(z).float())

    @torch.inference_mode()
    def traverse(self, z0: torch.Tensor, dims: list[int], values: list[float]) -> torch.Tensor:
        """Decode z0 with one coordinate at a time set to each value: (len(dims), len(values), C, S, S) in [0, 1]."""
        z = z0.reshape(1, 1, -1).repeat(len(dims), len(values), 1).to(self.head.weight.device)
        for i, d in enumerate(dims):
            z[i, :, d] = torch.tensor(values, dtype=z.dtype)
        out = torch.sigmoid(self.decode(z.flatten(0, 1)).float())
        return out.view(len(dims), len(values), *out.shape[1:])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        mu, logvar, logits = self.encode(x)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return {"mu": mu, "logvar": logvar, "logits": logits, "z": z, "recon_logits": self.decode(z)}


def vae_loss(
    model: ConvVAE, x: torch.Tensor, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-batch loss and its parts.

    beta-VAE: recon + beta * KL, recon = Bernoulli NLL summed over pixels, KL to N(0, I) summed over dims.
    DB-VAE (paper Eq. 5): L = CE(y, y_hat) + 1[y = class of interest] * (recon + beta * KL), averaged over the batch;
    with ``vae_class=None`` the indicator is 1 for every sample.
    """
    cfg = model.config
    out = model(x)
    mu, logvar = out["mu"], out["logvar"]
    recon = F.binary_cross_entropy_with_logits(out["recon_logits"].float(), x.float(), reduction="none").flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).float().sum(1)
    vae_term = recon + cfg.beta * kl
    parts: dict[str, float] = {}
    if cfg.n_classes and y is not None:
        ce = F.cross_entropy(out["logits"].float(), y, reduction="none")
        mask = torch.ones_like(ce) if cfg.vae_class is None else (y == cfg.vae_class).float()
        loss = (ce + mask * vae_term).mean()
        parts["ce"] = ce.mean().item()
        parts["acc"] = (out["logits"].argmax(1) == y).float().mean().item()
        denom = mask.sum().clamp_min(1.0)
        parts["recon"] = (recon * mask).sum().item() / denom.item()
        parts["kl"] = (kl * mask).sum().item() / denom.item()
    else:
        loss = vae_term.mean()
        parts["recon"] = recon.mean().item()
        parts["kl"] = kl.mean().item()
    parts["loss"] = loss.item()
    return loss, parts
