"""Shared by the novelty and service tests: one tiny trained run per test process, and image bytes to upload."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

TINY_SOURCE = "builtin:shapes?n=300"
TINY_SIZE = 32


@lru_cache(maxsize=1)
def _trained_template() -> Path:
    """Train once per process (1-2 s on 2 cores): 32 px, latent 6, width 8, 2 epochs."""
    from debias.training import TrainConfig
    from pipelines.train import TrainJob, run_train

    root = Path(tempfile.mkdtemp(prefix="debias-novelty-tests-"))
    old = os.environ.get("DEBIAS_CACHE_DIR")
    os.environ["DEBIAS_CACHE_DIR"] = str(root / "cache")
    try:
        run_train(
            TrainJob(
                data=TINY_SOURCE, out=root / "run", image_size=TINY_SIZE, latent_dim=6, width=8,
                train=TrainConfig(epochs=2, batch_size=64, seed=0, device="cpu"), progress=False,
            )
        )
    finally:
        if old is None:
            os.environ.pop("DEBIAS_CACHE_DIR", None)
        else:
            os.environ["DEBIAS_CACHE_DIR"] = old
    return root / "run"


def tiny_run(dest: Path) -> Path:
    """A fresh copy of the tiny run (model.pt and config, no novelty.pt) at ``dest``."""
    src = _trained_template()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "config.json"):
        shutil.copy2(src / name, dest / name)
    return dest


def shapes_images(n: int, seed: int = 1) -> np.ndarray:
    """(n, S, S, 3) uint8 in-distribution images (rows of the builtin set the model was trained on)."""
    from debias.data.builtin import BUILTIN_DATASETS

    images, _ = BUILTIN_DATASETS["shapes"](image_size=TINY_SIZE, n=max(n, 8), seed=0)
    return images[np.random.default_rng(seed).permutation(len(images))[:n]]


def noise_images(n: int, seed: int = 2, size: int = TINY_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def bad_uploads() -> dict[str, tuple[bytes, str]]:
    """The bad-input corpus: file name -> (bytes, expected fragment of the reason)."""
    good = encode(shapes_images(1)[0])
    grey16 = io.BytesIO()
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61)).save(grey16, "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (10, 20, 30, 40)).save(cmyk, "JPEG")
    huge = io.BytesIO()
    Image.new("1", (20000, 20000)).save(huge, "PNG")  # ~50 KB of bytes, 400 million pixels
    jpeg = encode(shapes_images(1)[0], "JPEG", quality=90)
    return {
        "empty.png": (b"", "empty file"),
        "truncated.png": (good[: len(good) // 2], "truncated"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notes.txt": (b"this is plain text, not a picture\n" * 20, "not an image"),
        "grey16.png": (grey16.getvalue(), "16-bit"),
        "cmyk.jpg": (cmyk.getvalue(), "CMYK"),
        "huge.png": (huge.getvalue(), "too large"),
    }
