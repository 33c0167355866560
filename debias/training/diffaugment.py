"""Differentiable augmentation for GAN training on small data (DiffAugment, Zhao et al., NeurIPS 2020).

A discriminator trained on a few hundred images memorises them and its gradients stop being useful to the generator.
DiffAugment applies the same random colour, translation and cutout transforms to real *and* fake images every time
the discriminator sees them; because the transforms are differentiable, the generator is trained through them and
learns the un-augmented distribution (augmenting only the real images would teach it to generate augmented ones).

Images are (B, C, H, W) in [-1, 1]; each image gets its own random parameters from torch's global generator (seeded
per epoch by the training loops, so a resumed run draws the same augmentations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DiffAugmentConfig:
    color: bool = True  # random brightness, saturation and contrast
    translation: float = 0.125  # largest shift as a fraction of the side; 0 = off
    cutout: float = 0.5  # side of the erased square as a fraction of the image side; 0 = off

    @property
    def enabled(self) -> bool:
        return self.color or self.translation > 0 or self.cutout > 0


def diff_augment(x: torch.Tensor, config: DiffAugmentConfig) -> torch.Tensor:
    if config.color:
        x = _color(x)
    if config.translation > 0:
        x = _translate(x, config.translation)
    if config.cutout > 0:
        x = _cutout(x, config.cutout)
    return x


def _rand(x: torch.Tensor, *shape: int) -> torch.Tensor:
    # Drawn on the CPU and moved: the same seed gives the same augmentation on any device.
    return torch.rand(*shape).to(device=x.device, dtype=x.dtype)


def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand(x, b, 1, 1, 1) - 0.5)  # brightness: shift by up to +-0.5 (a quarter of the [-1, 1] range)
    if x.shape[1] > 1:  # saturation: scale the distance to the grey value by 0..2
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand(x, b, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast: scale the distance to the mean by 0.5..1.5
    return (x - mean) * (_rand(x, b, 1, 1, 1) + 0.5) + mean


def _translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each image by up to ``ratio`` of its side in x and y, filling with zeros (mid-grey)."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1)).to(x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1)).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    # Index into a copy padded by one zero pixel on every side; out-of-range sources read the padding.
    rows = (rows + 1).clamp(0, h + 1).expand(b, h, w)
    cols = (cols + 1).clamp(0, w + 1).expand(b, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero a square of ``ratio`` of the side at a random centre of each image (it may hang over the edge)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h, (b, 1, 1)).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1)).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() * 2 < ch) & ((cols - cx).abs() * 2 < cw)  # (b, h, w)
    return x * (~inside).unsqueeze(1).to(x.dtype)
