"""Shared by the novelty and service tests: one tiny trained run per test process, and image bytes to upload."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

TINY_SOURCE = "builtin:shapes?n=300"
TINY_SIZE = 32


@lru_cache(maxsize=1)
def _trained_template() -> Path:
    """Train once per process (a few seconds on 2 cores): 32 px, latent 6, width 8, 2 epochs; and the contrastive
    encoder at its default 15 epochs of the 240 training rows (without the 600-step minimum: 15 steps)."""
    from debias.pipelines.train import TrainJob, run_train
    from debias.training.vae import TrainConfig

    root = Path(tempfile.mkdtemp(prefix="debias-novelty-tests-"))
    old = os.environ.get("DEBIAS_CACHE_DIR")
    os.environ["DEBIAS_CACHE_DIR"] = str(root / "cache")
    try:
        run_train(
            TrainJob(
                data=TINY_SOURCE, out=root / "run", image_size=TINY_SIZE, latent_dim=6, width=8,
                train=TrainConfig(epochs=2, batch_size=64, seed=0, device="cpu"), contrastive_min_steps=0, progress=False,
            )
        )
    finally:
        if old is None:
            os.environ.pop("DEBIAS_CACHE_DIR", None)
        else:
            os.environ["DEBIAS_CACHE_DIR"] = old
    return root / "run"


def tiny_run(dest: Path, encoder: bool = True) -> Path:
    """A fresh copy of the tiny run (model.pt and config, no novelty.pt) at ``dest``; with its contrastive encoder
    (contrastive/encoder.pt) unless ``encoder=False`` (a run trained with --contrastive-epochs 0)."""
    src = _trained_template()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "config.json"):
        shutil.copy2(src / name, dest / name)
    if encoder:
        (dest / "contrastive").mkdir(exist_ok=True)
        shutil.copy2(src / "contrastive" / "encoder.pt", dest / "contrastive" / "encoder.pt")
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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bad_uploads() -> dict[str, tuple[bytes, str, int]]:
    """The bad-input corpus: file name -> (bytes, expected fragment of the reason, expected HTTP status)."""
    good = encode(shapes_images(1)[0])
    grey16 = io.BytesIO()
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61)).save(grey16, "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (10, 20, 30, 40)).save(cmyk, "JPEG")
    huge = io.BytesIO()
    Image.new("1", (20000, 20000)).save(huge, "PNG")  # ~50 KB of bytes, 400 million pixels
    jpeg = encode(shapes_images(1)[0], "JPEG", quality=90)
    # a zTXt chunk that inflates to 64 MB from ~64 KB, after the pixels (so the header probe passes)
    bomb_chunk = _png_chunk(b"zTXt", b"note\0\0" + zlib.compress(b"a" * (64 * 2**20), 9))
    return {
        "empty.png": (b"", "empty file", 400),
        "truncated.png": (good[: len(good) // 2], "truncated", 400),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated", 400),
        "short.png": (good[:30], "truncated", 400),  # not even a whole header: still a damaged PNG, not "not an image"
        "notes.txt": (b"this is plain text, not a picture\n" * 20, "not an image", 415),
        "grey16.png": (grey16.getvalue(), "16-bit", 415),
        "cmyk.jpg": (cmyk.getvalue(), "CMYK", 415),
        "huge.png": (huge.getvalue(), "too large", 413),
        "bomb.png": (good[:-12] + bomb_chunk + good[-12:], "decompression bomb", 413),
    }
