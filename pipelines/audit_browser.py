"""What the audit browser (`/audit` of the service) needs from an audit, written next to scores.parquet.

    DIR/browser.json        which rows have thumbnails (the K rarest and K most typical), the latent histograms
    DIR/thumbs/ROW.png      one small PNG per such row, ROW = the row's position in scores.parquet

The images are written from the decoded pixels, not copied from ``path``: for builtin:NAME sources and MNIST idx
files ``path`` is not a file anyone could open, and the browser must work for every source.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from debias.density.estimators import LatentHistogramDensity
from debias.runtime.checkpoint import atomic_write_bytes, write_json

BROWSER_FORMAT = 1
#: Thumbnails per end of the rarity ranking; a few hundred small PNGs at most, so no sprite is needed.
DEFAULT_THUMBS = 64
_MIN_THUMB = 64  # small models work at 28-32 px: upscale (nearest) so the pixels can be seen


def thumbnail_png(image: np.ndarray) -> bytes:
    """PNG bytes of one (H, W, C) uint8 image, upscaled by an integer factor to at least 64 px."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    img = Image.fromarray(np.ascontiguousarray(arr))
    scale = max(1, -(-_MIN_THUMB // img.height))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def latent_histograms(density: LatentHistogramDensity) -> list[dict[str, Any]]:
    """The fitted per-axis histograms as JSON: label, bin edges and counts."""
    labels = (
        [f"pc{j}" for j in range(len(density.edges_))] if density.whiten else [f"z{d}" for d in density.dims_]
    )
    return [
        {"label": label, "edges": edges.tolist(), "counts": np.asarray(counts).astype(int).tolist()}
        for label, edges, counts in zip(labels, density.edges_, density.counts_)
    ]


def write_browser_assets(
    out: Path,
    pixels: Callable[[np.ndarray], np.ndarray],
    scores: pd.DataFrame,
    density: LatentHistogramDensity,
    k: int = DEFAULT_THUMBS,
) -> dict[str, Any]:
    """Write DIR/browser.json and DIR/thumbs/ for the K rarest and K most typical rows of ``scores``.

    ``pixels`` maps row positions to (k, H, W, C) uint8 images (whatever engine encoded them)."""
    order = np.argsort(-scores["rarity"].to_numpy(), kind="stable")
    k = min(k, len(order))
    rarest, typical = order[:k].tolist(), order[::-1][:k].tolist()
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    for old in thumbs.glob("*.png"):  # a re-run into the same folder: no thumbnail of another audit's row stays
        old.unlink()
    rows = np.asarray(sorted(set(rarest) | set(typical)), dtype=np.int64)
    for row, image in zip(rows.tolist(), pixels(rows) if len(rows) else []):
        atomic_write_bytes(thumbnail_png(image), thumbs / f"{row}.png")
    meta = {
        "format": BROWSER_FORMAT,
        "k": k,
        "n_rows": len(scores),
        "thumbs": {"rarest": rarest, "typical": typical},
        "latent_histograms": latent_histograms(density),
    }
    write_json(meta, out / "browser.json")
    return meta
