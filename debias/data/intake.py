"""Untrusted image bytes (uploads) -> pixels, or a clear reason why not.

:func:`debias.data.decode_image` is lenient on purpose: a dataset on disk is what it is, and 16-bit or CMYK files
are converted. Uploads to a service get a stricter policy so that a client learns that its file was not what it
thought: only the listed formats, 8 bits per channel, greyscale/RGB/palette modes, and a pixel budget checked from
the header before anything is decoded (a 20000 x 20000 PNG of a few kilobytes would otherwise take gigabytes).

Each refusal is an :class:`UploadError` with a ``kind`` that the service maps to an HTTP status:
``empty``, ``not_image``, ``unsupported`` (format or pixel mode), ``too_large`` (bytes or pixels), ``corrupt``.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from debias.data.decode import DECOMPRESSION_BOMB_REASON, ImageDecodeError, decode_image

DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
# 8-bit modes only: greyscale, RGB, palette, bilevel, with or without alpha. I;16 (16-bit PNG), I, F, CMYK, YCbCr,
# LAB and HSV are refused with a reason instead of being converted behind the client's back.
ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The first bytes of each accepted format: a file that starts like one but cannot be opened is a damaged image (400),
# not something other than an image (415).
_SIGNATURES = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_BOMB = "decompressed data too large"  # Pillow's message for an oversized zTXt, iTXt or iCCP chunk


class UploadError(ValueError):
    """An upload that cannot be scored; ``reason`` is a short sentence for the client, ``kind`` its category."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class UploadInfo:
    format: str
    mode: str
    width: int
    height: int


def _png_bit_depth(data: bytes) -> int | None:
    # IHDR is the first chunk: 8-byte signature, 4-byte length, b"IHDR", width, height, then the bit depth byte.
    # Pillow opens 16-bit RGB(A) PNGs as 8-bit 'RGB(A)', so the mode alone does not reveal them.
    if data.startswith(_PNG_SIGNATURE) and len(data) > 24 and data[12:16] == b"IHDR":
        return data[24]
    return None


def probe_upload(
    data: bytes, *, max_pixels: int, max_bytes: int | None = None, formats: frozenset[str] = DEFAULT_FORMATS
) -> UploadInfo:
    """Check an upload from its header only (no pixel decoding); raise :class:`UploadError` if it is unusable."""
    if len(data) == 0:
        raise UploadError("empty", "empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise UploadError("too_large", f"file too large ({len(data)} bytes, limit {max_bytes})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (w, h) = img.format or "?", img.mode, img.size
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise UploadError("corrupt", "truncated image data (the header is incomplete)") from None
        raise UploadError("not_image", "not an image (unrecognised file format)") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses to even open images over twice its own limit; its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise UploadError("too_large", f"image too large ({size}, limit {max_pixels})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc).lower()
        if _BOMB in text:
            raise UploadError("too_large", DECOMPRESSION_BOMB_REASON) from None
        if isinstance(exc, EOFError) or "truncated" in text:
            raise UploadError("corrupt", "truncated image data") from None
        raise UploadError("corrupt", f"unreadable image header ({str(exc).splitlines()[0][:120]})") from None
    if fmt not in formats:
        raise UploadError("unsupported", f"unsupported format {fmt} (accepted: {', '.join(sorted(formats))})")
    if w <= 0 or h <= 0:
        raise UploadError("corrupt", "image has zero size")
    if w * h > max_pixels:
        raise UploadError("too_large", f"image too large ({w}x{h} = {w * h} pixels, limit {max_pixels})")
    depth = _png_bit_depth(data) if fmt == "PNG" else None
    if depth is not None and depth > 8:
        raise UploadError("unsupported", f"unsupported {depth}-bit PNG (send 8 bits per channel)")
    if mode not in ACCEPTED_MODES:
        what = {"CMYK": "CMYK colour", "I;16": "16-bit greyscale", "I": "32-bit integer", "F": "floating-point"}
        raise UploadError(
            "unsupported",
            f"unsupported pixel mode {mode}" + (f" ({what[mode]})" if mode in what else "")
            + " (send 8-bit greyscale or RGB)",
        )
    return UploadInfo(format=fmt, mode=mode, width=w, height=h)


def decode_upload(
    data: bytes,
    image_size: int,
    channels: int,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: frozenset[str] = DEFAULT_FORMATS,
    probed: bool = False,
) -> np.ndarray:
    """:func:`probe_upload` (skipped when the caller already did: ``probed=True``), then decode to
    (image_size, image_size, channels) uint8 exactly as datasets are."""
    if not probed:
        probe_upload(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return decode_image(data, image_size, channels, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        kind = "too_large" if exc.reason.startswith("image too large") else "corrupt"
        raise UploadError(kind, exc.reason) from None
