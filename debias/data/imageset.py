"""``load_images(SOURCE)`` -> :class:`ImageSet`: decoded once into the cache, then memory-mapped."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from debias.data.cache import (
    build_store,
    cache_root,
    load_store,
    make_fingerprint,
    report_skipped,
)
from debias.data.sources import Source, apply_where, normalised_where, resolve_source
from debias.errors import DataError

__all__ = ["ImageSet", "SourceRows", "list_rows", "load_images"]


@dataclass(eq=False, repr=False)
class ImageSet:
    """Decoded images with one table row each.

    ``images`` is (N, H, W, C) uint8, memory-mapped from the cache store; ``table`` has N rows
    (RangeIndex), ``path`` first, then the source's metadata columns; ``skipped`` lists the files
    that could not be read (``path``, ``reason``)."""

    images: np.ndarray
    table: pd.DataFrame
    skipped: pd.DataFrame
    fingerprint: str
    source: str
    image_size: int
    channels: int
    root: Path | None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageSet({self.source!r}, n={len(self)}, size={self.image_size}, channels={self.channels}, "
            f"skipped={len(self.skipped)}, fingerprint={self.fingerprint!r})"
        )

    def batch(self, idx: Any) -> torch.Tensor:
        """float32 (B, C, H, W) in [0, 1] for an index array, list, bool mask or slice."""
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        elif not isinstance(idx, slice):
            idx = _as_indices(idx, len(self))
        arr = np.ascontiguousarray(self.images[idx])
        if not arr.flags.writeable:  # a slice of the read-only memmap: torch wants its own copy
            arr = arr.copy()
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW while still uint8
        return t.to(torch.float32).div_(255.0)

    def subset(self, idx: Any) -> "ImageSet":
        """The rows ``idx`` (int array/list, bool mask or slice), table re-indexed 0..k-1.

        The subset gets its own fingerprint, derived from the parent's and the row numbers."""
        if isinstance(idx, slice):
            rows = np.arange(len(self))[idx]
            images = self.images[idx]
        else:
            rows = _as_indices(idx, len(self))
            images = self.images[rows]
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            fp = self.fingerprint
        else:
            h = hashlib.sha256(self.fingerprint.encode())
            h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
            fp = h.hexdigest()[:16]
        return ImageSet(
            images=images,
            table=self.table.iloc[rows].reset_index(drop=True),
            skipped=self.skipped,
            fingerprint=fp,
            source=self.source,
            image_size=self.image_size,
            channels=self.channels,
            root=self.root,
        )


def _as_indices(idx: Any, n: int) -> np.ndarray:
    arr = np.asarray(idx)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean mask of length {arr.shape} for {n} rows")
        return np.flatnonzero(arr)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"row indices must be integers or a boolean mask, not {arr.dtype}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.min() < -n or arr.max() >= n:
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(arr < 0, arr + n, arr)


@dataclass
class SourceRows:
    """A SOURCE listed and filtered but not decoded: what :func:`load_images` decodes into the cache, and what a
    distributed engine (pipelines/ray_audit.py) decodes row by row with ``source.loader(table, ...)`` instead."""

    source: Source
    source_str: str
    table: pd.DataFrame  # the rows ``where`` keeps, with their index labels in the unfiltered source
    where: list[str]
    channels: int
    fingerprint: str  # the cache key: the same rows, size and channels give the same fingerprint in every engine


def list_rows(
    source: str, *, where: Sequence[str] = (), image_size: int = 64, channels: int | None = None
) -> SourceRows:
    """Resolve SOURCE and apply ``where`` (reads no pixels); one-line :class:`DataError` for bad arguments."""
    source_str = os.fspath(source)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, not {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels!r}")
    if where is None:
        where = []
    elif isinstance(where, str):
        where = [where]
    where = list(where)
    src = resolve_source(source_str)
    table = apply_where(src.table, where)
    if channels is None:
        channels = src.default_channels(table)
    fp = make_fingerprint(
        src.kind, src.canonical, src.identity(table), normalised_where(where), int(image_size), channels
    )
    return SourceRows(src, source_str, table, where, channels, fp)


def load_images(
    source: str,
    *,
    where: Sequence[str] = (),
    image_size: int = 64,
    channels: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> ImageSet:
    """Read SOURCE (image folder, CSV/Parquet manifest, idx folder or ``builtin:NAME?k=v``) as an
    :class:`ImageSet` of ``image_size`` x ``image_size`` images.

    Rows are filtered by ``where`` (``COL=VALUE``; OR within a column, AND across columns) before
    anything is decoded. Decoded pixels are cached under ``cache_dir`` (default :func:`cache_root`)
    keyed by the content of the source, the filters, the size and the channel count, so the same
    call again decodes nothing. Unreadable images are reported on stderr, listed in ``skipped`` and
    left out; if none can be read, :class:`DataError`.
    """
    rows = list_rows(source, where=where, image_size=image_size, channels=channels)
    src, table, channels, fp = rows.source, rows.table, rows.channels, rows.fingerprint
    image_size, where, source_str = int(image_size), rows.where, rows.source_str
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()

    store = load_store(root / fp, image_size, channels)
    if store is None:
        meta = {
            "source": source_str,
            "kind": src.kind,
            "canonical": src.canonical,
            "where": normalised_where(where),
            "candidates": int(len(table)),
        }
        store = build_store(
            root,
            fp,
            table.reset_index(drop=True),
            src.loader(table, image_size, channels),
            image_size=image_size,
            channels=channels,
            workers=workers if workers is not None else (os.cpu_count() or 1),
            progress=progress,
            meta=meta,
            what=f"{len(table)} images",
        )
    report_skipped(store.skipped)
    _warn_duplicate_paths(store.table)
    return ImageSet(
        images=store.images,
        table=store.table,
        skipped=store.skipped,
        fingerprint=fp,
        source=source_str,
        image_size=image_size,
        channels=channels,
        root=src.root,
    )


def _warn_duplicate_paths(table: pd.DataFrame) -> None:
    """A manifest that lists a file twice makes it count twice (in training, in an audit's group shares); that may be
    deliberate oversampling, so the rows are kept, but the user is told once, on stderr."""
    if "path" not in table.columns or len(table) < 2:
        return
    dup = table["path"].astype(str).duplicated(keep="first")
    if dup.any():
        first = table["path"].astype(str)[dup].iloc[0]
        print(
            f"warning: {int(dup.sum())} rows repeat a path listed earlier (first: {first}); "
            "each copy counts as its own row",
            file=sys.stderr,
        )
