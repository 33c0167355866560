"""MNIST-style idx files (plain or gzip), parsed with numpy only.

Layout: 2 zero bytes, a type code, the number of dimensions, one big-endian uint32 per dimension,
then the data in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from debias.errors import DataError

__all__ = ["IdxPair", "find_idx_pairs", "read_idx", "read_idx_header", "is_idx_folder"]

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IMAGES_RE = re.compile(r"^(?P<prefix>.+?)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
_SPLIT_NAMES = {"train": "train", "t10k": "test", "test": "test"}
_SPLIT_ORDER = {"train": 0, "test": 1}


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _parse_header(head: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = head[3]
    need = 4 + 4 * ndim
    if len(head) < need:
        raise DataError(f"{path} is not an idx file (header cut short)")
    shape = struct.unpack(f">{ndim}I", head[4:need])
    return _DTYPES[head[2]], tuple(int(s) for s in shape), need


def read_idx_header(path: str | Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from the header alone (reads a few bytes even for .gz files)."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * 255)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read idx file {path}: {exc}") from None
    dtype, shape, _ = _parse_header(head, path)
    return dtype, shape


def read_idx(path: str | Path) -> tuple[np.ndarray, int]:
    """(array of the complete items present, number of items the header declares).

    A file cut short (truncated download) returns only the items that are fully present.
    """
    path = Path(path)
    chunks: list[bytes] = []
    try:
        with _open(path) as f:
            while True:
                try:
                    block = f.read(1 << 22)
                except EOFError:  # gzip stream cut short: keep what was decompressed
                    break
                if not block:
                    break
                chunks.append(block)
    except OSError as exc:
        if not chunks:
            raise DataError(f"cannot read idx file {path}: {exc}") from None
    raw = b"".join(chunks)
    dtype, shape, off = _parse_header(raw, path)
    declared = shape[0] if shape else 1
    item = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    nbytes_item = item * dtype.itemsize
    available = min(declared, (len(raw) - off) // nbytes_item if nbytes_item else declared)
    arr = np.frombuffer(raw, dtype=dtype, count=available * item, offset=off)
    arr = arr.reshape((available, *shape[1:])) if shape else arr
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr, declared


@dataclass(frozen=True)
class IdxPair:
    prefix: str
    split: str
    images: Path
    labels: Path | None


def _split_of(prefix: str) -> str:
    last = re.split(r"[-_.]", prefix)[-1].lower()
    return _SPLIT_NAMES.get(last, prefix)


def find_idx_pairs(folder: str | Path) -> list[IdxPair]:
    """Image files ``*-images-idx3-ubyte[.gz]`` / ``*-images.idx3-ubyte[.gz]`` in ``folder`` (not
    recursive), each paired with its ``*-labels-idx1-ubyte`` file of the same prefix. Plain files
    are preferred over .gz when both exist. Order: train, test, then the others by name."""
    folder = Path(folder)
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if "idx" in e.name and e.is_file())
    except OSError:
        return []
    by_prefix: dict[str, str] = {}
    for name in names:
        m = _IMAGES_RE.match(name)
        if not m:
            continue
        prefix = m.group("prefix")
        if prefix not in by_prefix or (by_prefix[prefix].endswith(".gz") and not m.group("gz")):
            by_prefix[prefix] = name
    pairs = []
    for prefix, image_name in by_prefix.items():
        labels = None
        for cand in (
            f"{prefix}-labels-idx1-ubyte",
            f"{prefix}-labels.idx1-ubyte",
            f"{prefix}-labels-idx1-ubyte.gz",
            f"{prefix}-labels.idx1-ubyte.gz",
        ):
            if cand in names:
                labels = folder / cand
                break
        pairs.append(IdxPair(prefix, _split_of(prefix), folder / image_name, labels))
    pairs.sort(key=lambda p: (_SPLIT_ORDER.get(p.split, 2), p.prefix))
    return pairs


def is_idx_folder(folder: str | Path) -> bool:
    return bool(find_idx_pairs(folder))
