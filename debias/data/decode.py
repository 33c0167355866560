"""Decode one image file (or its bytes) into a square uint8 array of a fixed size.

Every way an input can be unusable ends in :class:`ImageDecodeError` with a short human reason, so a
loader can record it and carry on with the other files.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from debias.errors import DataError

__all__ = ["ImageDecodeError", "decode_image", "is_greyscale_mode", "probe_mode", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Pillow may run external programs for these (Ghostscript): never load them from a dataset.
_REFUSED_FORMATS = frozenset({"EPS", "PDF"})


class ImageDecodeError(DataError):
    """One image could not be read; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_greyscale_mode(mode: str) -> bool:
    """True for Pillow modes that carry a single intensity channel (with or without alpha)."""
    return mode in ("1", "L", "LA", "La", "F") or mode.startswith("I")


def probe_mode(path: str | Path) -> str | None:
    """The Pillow mode of an image file from its header only, or None if it cannot be opened."""
    try:
        with Image.open(path) as img:
            return img.mode
    except Exception:  # noqa: BLE001 - any failure means "not readable" here
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    return text[:200]


_BOMB = "decompressed data too large"  # Pillow's message for an oversized compressed zTXt, iTXt or iCCP chunk
DECOMPRESSION_BOMB_REASON = "image too large: a compressed metadata chunk expands beyond the limit (decompression bomb)"


def _load_error_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if _BOMB in text:
        # Pillow's cap on a compressed text or ICC chunk (zTXt, iTXt, iCCP): a decompression bomb, not damage.
        return DECOMPRESSION_BOMB_REASON
    if isinstance(exc, EOFError) or "truncated" in text or "premature end" in text:
        return "truncated image data"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return f"corrupt image data ({_one_line(exc)})"


def _numeric_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit 'L', keeping relative brightness where possible.

    Integer images use the full range of their container (16-bit: 0..65535 -> 0..255); values that
    already fit 0..255 are kept; anything else (negative, floats outside 0..1 or 0..255) is stretched
    min..max.
    """
    arr = np.asarray(img)
    if arr.ndim != 2:
        arr = arr.reshape(arr.shape[0], arr.shape[1], -1)[..., 0]
    a = arr.astype(np.float64, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = a * 255.0
    elif lo >= 0.0 and hi <= 255.0 and not img.mode.startswith("I;16"):
        out = a
    elif lo >= 0.0 and hi <= 65535.0 and img.mode != "F":
        out = a / 257.0
    elif hi > lo:
        out = (a - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite an image with alpha onto a white background ('L' or 'RGB' result)."""
    if img.mode in ("LA", "La"):
        if img.mode == "La":
            img = img.convert("LA")
        base = Image.new("L", img.size, 255)
        base.paste(img.getchannel("L"), mask=img.getchannel("A"))
        return base
    if img.mode != "RGBA":
        img = img.convert("RGBA")
    base = Image.new("RGB", img.size, (255, 255, 255))
    base.paste(img.convert("RGB"), mask=img.getchannel("A"))
    return base


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        if "transparency" in img.info:
            return _flatten_alpha(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("PA", "RGBA", "RGBa", "LA", "La"):
        return _flatten_alpha(img)
    if mode.startswith("I") or mode == "F":
        return _numeric_to_l(img)
    try:
        return img.convert("RGB")  # CMYK, YCbCr, RGBX, HSV, ...
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported image mode {mode} ({_one_line(exc)})") from exc


def _finish(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    img = _to_l_or_rgb(img)
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if (w, h) != (side, side):
        img = img.crop(box)  # crop first: resize(box=...) would blend in pixels from outside the box
    if side == image_size:
        out = img
    else:
        # Pillow's BILINEAR widens its kernel with the scale factor (antialiased); reducing_gap first
        # box-reduces very large inputs by an integer factor, which is fast and exact enough.
        out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    if channels == 3 and out.mode != "RGB":
        out = out.convert("RGB")
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def decode_image(
    data: bytes | str | Path, image_size: int, channels: int, max_pixels: int = 50_000_000
) -> np.ndarray:
    """Decode ``data`` (file path or encoded bytes) to a ``(image_size, image_size, channels)`` uint8 array.

    Any mode is converted sensibly (alpha is composited onto white; 16-bit and float greyscale are
    rescaled to 8 bits; palette, CMYK, bilevel become RGB/L); EXIF orientation is applied; a
    non-square image is centre-cropped to a square before resizing. JPEGs are decoded at a reduced
    DCT scale when that still leaves at least ``image_size`` pixels per side.

    Raises :class:`ImageDecodeError` with a short reason for anything that cannot be used: missing or
    empty file, not an image, truncated or corrupt data, more than ``max_pixels`` pixels.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels!r}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, not {image_size!r}")
    image_size = int(image_size)

    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("empty file")
        fp: object = io.BytesIO(bytes(data))
    else:
        path = os.fspath(data)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ImageDecodeError("file not found") from None
        except PermissionError:
            raise ImageDecodeError("permission denied") from None
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file ({_one_line(exc)})") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageDecodeError("is a folder, not a file")
        if st.st_size == 0:
            raise ImageDecodeError("empty file")
        fp = path

    try:
        img = Image.open(fp)  # type: ignore[arg-type]
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (cannot identify format)") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"image too large (over {max_pixels} pixels)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, EOFError) or "truncated" in str(exc).lower() or _BOMB in str(exc).lower():
            raise ImageDecodeError(_load_error_reason(exc)) from None
        raise ImageDecodeError(f"not an image ({_one_line(exc)})") from None

    try:
        if img.format in _REFUSED_FORMATS:
            raise ImageDecodeError(f"unsupported format {img.format}")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError("image has zero size")
        if w * h > max_pixels:
            raise ImageDecodeError(f"image too large ({w}x{h} = {w * h} pixels, limit {max_pixels})")
        if img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (image_size, image_size))
        try:
            img.load()
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError:
            raise ImageDecodeError(f"image too large (over {max_pixels} pixels)") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError) as exc:
            raise ImageDecodeError(_load_error_reason(exc)) from None
        try:
            loaded = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - a malformed EXIF block is no reason to drop the image
            loaded = img
        try:
            return _finish(loaded, image_size, channels)
        except ImageDecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
            raise ImageDecodeError(_load_error_reason(exc)) from None
    finally:
        img.close()
