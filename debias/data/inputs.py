"""Whatever a Python caller hands the API, as an :class:`ImageSet` at a model's size: no caller resizes by hand.

Accepted: an :class:`ImageSet`, a SOURCE string (folder, manifest, idx folder, ``builtin:``), a list of file paths
or PIL images, a uint8 array ``(N, H, W)`` or ``(N, H, W, C)``, or a float tensor / array ``(N, C, H, W)`` in
[0, 1]. Everything goes through the same conversion as the CLI's decoder (centre crop to a square, resize, grey or
RGB), so the Python API and `debias audit` / `debias score` see the same pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from PIL import Image

from debias.data.decode import _finish, decode_image
from debias.data.imageset import ImageSet, load_images
from debias.errors import DebiasError

ImagesLike = Union[ImageSet, str, Path, Sequence[Any], np.ndarray, torch.Tensor]


def where_list(where: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"split": "train", "race": ["black", "white"]}`` -> ``["split=train", "race=black", "race=white"]`` (the
    CLI's ``--where`` form: any of the values of one column, all of the columns)."""
    if where is None:
        return []
    if isinstance(where, Mapping):
        out = []
        for col, value in where.items():
            values = value if isinstance(value, (list, tuple, set)) else [value]
            out += [f"{col}={v}" for v in values]
        return out
    if isinstance(where, str):
        return [where]
    return [str(w) for w in where]


def as_image_set(x: ImagesLike, image_size: int, channels: int, *, progress: bool = False) -> ImageSet:
    """``x`` as an ImageSet of ``image_size`` x ``image_size`` images with ``channels`` channels."""
    if isinstance(x, ImageSet):
        if x.image_size == image_size and x.channels == channels:
            return x
        arr = _convert_array(np.asarray(x.images), image_size, channels)
        return _in_memory(arr, x.table, source=x.source)
    if isinstance(x, (str, Path)):
        return load_images(str(x), image_size=image_size, channels=channels, progress=progress)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if np.issubdtype(x.dtype, np.floating):
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise DebiasError(f"a float array must be (N, C, H, W) with C = 1 or 3 and values in [0, 1], got {x.shape}")
            if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
                raise DebiasError("a float array must hold values in [0, 1] (uint8 arrays hold 0-255)")
            x = np.round(np.transpose(x, (0, 2, 3, 1)) * 255).astype(np.uint8)
        elif x.dtype != np.uint8:
            raise DebiasError(f"an image array must be uint8 (N, H, W[, C]) or float (N, C, H, W) in [0, 1], not {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
            raise DebiasError(f"a uint8 image array must be (N, H, W) or (N, H, W, C) with C = 1, 3 or 4, got {x.shape}")
        arr = _convert_array(x, image_size, channels)
        return _in_memory(arr, pd.DataFrame({"path": [f"<array>[{i}]" for i in range(len(arr))]}), source="<array>")
    if isinstance(x, Sequence) and not isinstance(x, (bytes, bytearray)):
        rows = []
        for i, item in enumerate(x):
            if isinstance(item, Image.Image):
                rows.append(_finish(item, image_size, channels))
            elif isinstance(item, (str, Path)):
                rows.append(decode_image(item, image_size, channels))
            else:
                raise DebiasError(f"item {i} of the list is a {type(item).__name__}: expected file paths or PIL images")
        names = [str(item) if isinstance(item, (str, Path)) else f"<image>[{i}]" for i, item in enumerate(x)]
        arr = np.stack(rows) if rows else np.zeros((0, image_size, image_size, channels), np.uint8)
        return _in_memory(arr.reshape(len(rows), image_size, image_size, channels), pd.DataFrame({"path": names}),
                          source="<list>")
    raise DebiasError(
        f"cannot read images from a {type(x).__name__}: pass an ImageSet, a source string, a list of paths or PIL "
        "images, a uint8 array (N, H, W[, C]) or a float tensor (N, C, H, W) in [0, 1]"
    )


def _convert_array(arr: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, S, S, channels) uint8, each image as the decoder would have made it."""
    n, h, w, c = arr.shape
    if h == w == image_size and c == channels:
        return np.ascontiguousarray(arr)
    out = np.empty((n, image_size, image_size, channels), np.uint8)
    for i in range(n):
        img = Image.fromarray(np.ascontiguousarray(arr[i, ..., 0] if c == 1 else arr[i]))  # L, RGB or RGBA
        out[i] = _finish(img, image_size, channels).reshape(image_size, image_size, channels)
    return out


def _in_memory(images: np.ndarray, table: pd.DataFrame, *, source: str) -> ImageSet:
    fingerprint = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    return ImageSet(
        images=images,
        table=table.reset_index(drop=True),
        skipped=pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)}),
        fingerprint=fingerprint,
        source=source,
        image_size=int(images.shape[1]),
        channels=int(images.shape[3]),
        root=None,
    )
