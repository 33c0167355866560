"""CycleGAN networks (Zhu et al., ICCV 2017): a ResNet generator and a 70x70-style PatchGAN discriminator.

As in the paper: the generator is c7s1-w, two stride-2 down-samplings, ``n_blocks`` residual blocks, two up-samplings,
c7s1-C with tanh, instance norm and reflection padding throughout; the discriminator is C(w)-C(2w)-C(4w)-C(8w) with
4x4 convolutions and LeakyReLU(0.2), instance norm from the second layer on, and a one-channel map of per-patch
logits. Instance norm is per image, so every image's output is independent of the rest of its batch.

Images are (B, C, S, S) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CycleGANConfig:
    image_size: int = 64  # 28..128 px, square
    channels: int = 3  # 1 or 3
    width: int = 32  # generator: channels of its first layer (the paper: 64)
    n_blocks: int = 6  # residual blocks (the paper: 6 at 128 px, 9 at 256 px; see default_n_blocks)
    disc_width: int = 32  # discriminator: channels of its first layer (the paper: 64)
    disc_layers: int = 3  # stride-2 layers of the discriminator (3 = the 70x70 PatchGAN)

    def __post_init__(self) -> None:
        if not 28 <= self.image_size <= 128:
            raise ValueError(f"image_size must be between 28 and 128, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.width < 1 or self.disc_width < 1 or self.n_blocks < 0 or self.disc_layers < 1:
            raise ValueError("widths and layer counts must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def default_n_blocks(image_size: int) -> int:
    """Residual blocks for an image size. The reference uses 9 at 256 px and 6 at 128 px: at its 4x down-sampled
    bottleneck (64 and 32 px) the blocks' 3x3 convolutions then see most of the image. At 64 px the bottleneck is
    16 px wide and 3 blocks already see 13 of them, at half the cost of 6 (the blocks are ~90 % of a generator's
    work): what makes a CPU epoch practical (docs/benchmarks.md, issue 17)."""
    if image_size >= 256:
        return 9
    if image_size >= 128:
        return 6
    return 3 if image_size >= 64 else 2


def _init_normal(module: nn.Module) -> None:
    # The reference implementation's default: N(0, 0.02) weights, zero biases.
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    def __init__(self, config: CycleGANConfig) -> None:
        super().__init__()
        self.config = config
        w, c = config.width, config.channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(c, w, 7), nn.InstanceNorm2d(w), nn.ReLU(True)]
        for mult in (1, 2):  # down-sample twice: w -> 2w -> 4w
            layers += [nn.Conv2d(w * mult, w * mult * 2, 3, 2, 1), nn.InstanceNorm2d(w * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(4 * w) for _ in range(config.n_blocks)]
        for mult in (4, 2):  # up-sample twice: 4w -> 2w -> w
            layers += [
                nn.ConvTranspose2d(w * mult, w * mult // 2, 3, 2, 1, output_padding=1),
                nn.InstanceNorm2d(w * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w, c, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.shape[-2:] != x.shape[-2:]:  # sizes not divisible by 4 come back a pixel or two larger
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


class PatchDiscriminator(nn.Module):
    def __init__(self, config: CycleGANConfig) -> None:
        super().__init__()
        self.config = config
        w = config.disc_width
        layers: list[nn.Module] = [nn.Conv2d(config.channels, w, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c_in = w
        for i in range(1, config.disc_layers + 1):
            c_out = w * min(2**i, 8)
            stride = 2 if i < config.disc_layers else 1  # the last feature layer keeps the resolution
            layers += [nn.Conv2d(c_in, c_out, 4, stride, 1), nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        layers += [nn.Conv2d(c_in, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> a map of per-patch real/fake scores (B, 1, h, w)."""
        return self.net(x)
