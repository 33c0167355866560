"""Reconstruction-error heatmaps: where in the image the model fails to reproduce what it sees.

A heatmap is one PNG with three panels side by side: the input as the model saw it, its reconstruction from the
posterior mean, and the squared error per pixel (mean over channels) in the 'inferno' colour map. The error scale
is fixed (0 to ``vmax``), not stretched per image, so two heatmaps can be compared by eye.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

#: Squared error mapped to the top of the colour scale; errors are of pixel values in [0, 1].
DEFAULT_VMAX = 0.25
_MIN_PANEL = 128  # small models work at 28-64 px: upscale (nearest) so a person can see the pixels


@lru_cache(maxsize=1)
def _inferno_lut() -> np.ndarray:
    from matplotlib import (
        colormaps,  # lazy: matplotlib is only needed when a heatmap is asked for
    )

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def error_map(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """(H, W) squared error per pixel, mean over channels, of (C, H, W) arrays in [0, 1]."""
    return np.square(np.asarray(recon, np.float32) - np.asarray(x, np.float32)).mean(0)


def heatmap_png(x: np.ndarray, recon: np.ndarray, vmax: float = DEFAULT_VMAX) -> bytes:
    """PNG bytes of [input | reconstruction | error heatmap] for one image, (C, H, W) arrays in [0, 1]."""
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    recon = np.clip(np.asarray(recon, np.float32), 0, 1)

    def rgb(a: np.ndarray) -> np.ndarray:
        a = (a * 255).round().astype(np.uint8).transpose(1, 2, 0)
        return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a

    err = np.clip(error_map(x, recon) / vmax, 0, 1)
    heat = _inferno_lut()[(err * 255).round().astype(np.uint8)]
    panels = np.concatenate([rgb(x), rgb(recon), heat], axis=1)
    h = panels.shape[0]
    scale = max(1, -(-_MIN_PANEL // h))
    img = Image.fromarray(panels, "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, h * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
