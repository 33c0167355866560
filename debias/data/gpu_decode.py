"""JPEG decoding on the GPU (nvJPEG through torchvision), for batches that are scored on CUDA anyway.

The CPU path (:func:`debias.data.decode_image`, Pillow) is the reference; this one follows its geometry (EXIF
orientation, centre crop to a square, antialiased bilinear resize) but not its exact pixel values: nvJPEG's IDCT and
the tensor resize differ from Pillow's by a few grey levels, which moves scores slightly. Anything that nvJPEG
refuses (CMYK, progressive oddities, a torchvision without GPU decoding) falls back to the CPU path image by image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def gpu_jpeg_available(device: torch.device) -> bool:
    """True when ``device`` is CUDA and this torchvision can decode JPEGs there."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _square_resize(img: torch.Tensor, image_size: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, S, S) float in [0, 1]: centre crop to a square, then antialiased bilinear resize."""
    _, h, w = img.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = img[:, top : top + side, left : left + side].unsqueeze(0).float().div_(255.0)
    if side != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x.squeeze(0).clamp_(0.0, 1.0)


def decode_jpegs_on_device(
    blobs: Sequence[bytes],
    image_size: int,
    channels: int,
    device: torch.device,
    cpu_decode: Callable[[bytes], np.ndarray],
) -> torch.Tensor:
    """(B, C, S, S) float images on ``device`` from JPEG bytes, decoded on the GPU where possible.

    ``cpu_decode(bytes) -> (S, S, C) uint8`` handles what the GPU path cannot, so every blob yields an image or the
    CPU decoder's own error.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * len(blobs)
    try:
        datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decoded = decode_jpeg(datas, mode=mode, device=device, apply_exif_orientation=True)
        for i, img in enumerate(decoded):
            out[i] = _square_resize(img, image_size)
    except (RuntimeError, ValueError):
        # One bad blob fails the whole batched call: retry one by one so only that one goes to the CPU.
        for i, b in enumerate(blobs):
            try:
                img = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=mode, device=device,
                                  apply_exif_orientation=True)
                out[i] = _square_resize(img, image_size)
            except (RuntimeError, ValueError):
                out[i] = None
    for i, t in enumerate(out):
        if t is None:
            arr = cpu_decode(blobs[i])
            out[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device).float().div_(255.0)
    return torch.stack(out)  # type: ignore[arg-type]
