"""What a SOURCE string names, as a table of rows plus a way to turn each row into pixels.

Four kinds: a folder of image files, a CSV/Parquet manifest, a folder of MNIST-style idx files and
``builtin:NAME``. :func:`resolve_source` reads only what is needed to list the rows (never pixels), so
a cached load stays cheap; :meth:`Source.loader` is only called when the cache has to be built.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from debias.data.builtin import PREFIX as BUILTIN_PREFIX
from debias.data.builtin import BuiltinDataset, canonical_builtin, parse_builtin
from debias.data.decode import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    is_greyscale_mode,
    probe_mode,
)
from debias.data.idx import IdxPair, find_idx_pairs, read_idx, read_idx_header
from debias.errors import DataError

__all__ = ["Source", "resolve_source", "apply_where", "MANIFEST_SUFFIXES"]

MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_PROBE_LIMIT = 1000  # files tried when guessing the channel count


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().replace("\n", " ") or type(exc).__name__)[:300]


@dataclass
class Source:
    """A resolved SOURCE: every row it has (``table``, RangeIndex) and how to read them."""

    kind: str  # "folder" | "manifest" | "idx" | "builtin"
    canonical: str  # absolute path, or the canonical builtin string
    root: Path | None
    table: pd.DataFrame
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ files (folder and manifest)
    def _file_paths(self, rows: pd.Index) -> list[str | None]:
        paths: list[str | None] = self._extra["files"]
        return [paths[i] for i in rows]

    def default_channels(self, table: pd.DataFrame) -> int:
        """1 for idx, 3 for builtin; for files, 1 if the first readable image is greyscale."""
        if self.kind == "idx":
            return 1
        if self.kind == "builtin":
            return 3
        for i, p in enumerate(self._file_paths(table.index)):
            if i >= _PROBE_LIMIT:
                break
            if p is None:
                continue
            mode = probe_mode(p)
            if mode is not None:
                return 1 if is_greyscale_mode(mode) else 3
        return 3

    def identity(self, table: pd.DataFrame) -> str:
        """Hash of what the kept rows' pixels depend on (never reads pixel data)."""
        h = hashlib.sha256()
        if self.kind == "builtin":
            h.update(self.canonical.encode())
        elif self.kind == "idx":
            for pair in self._extra["pairs"]:
                for p in (pair.images, pair.labels):
                    if p is None:
                        continue
                    st = os.stat(p)
                    h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            if self.kind == "manifest":
                h.update(self._extra["manifest_sha256"].encode())
            for rel, p in zip(table["path"].tolist(), self._file_paths(table.index)):
                try:
                    st = os.stat(p) if p is not None else None
                    size, mtime = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
                except OSError:
                    size, mtime = -1, -1
                h.update(f"{rel}\0{size}\0{mtime}\n".encode())
        return h.hexdigest()

    def loader(self, table: pd.DataFrame, image_size: int, channels: int) -> Callable[[int], np.ndarray]:
        """A thread-safe function: position in ``table`` -> (H, W, C) uint8, or ImageDecodeError."""
        if self.kind in ("folder", "manifest"):
            paths = self._file_paths(table.index)

            def load_file(pos: int) -> np.ndarray:
                p = paths[pos]
                if p is None:
                    raise ImageDecodeError("empty path")
                return decode_image(p, image_size, channels)

            return load_file

        if self.kind == "builtin":
            ds: BuiltinDataset = self._extra["dataset"]
            params = self._extra["params"]
            records = table.to_dict("records")
            index = table.index.to_numpy()

            def load_builtin(pos: int) -> np.ndarray:
                img = ds.render(records[pos], int(index[pos]), params, image_size)
                return img if channels == 3 else np.asarray(Image.fromarray(img).convert("L"))[:, :, None]

            return load_builtin

        # idx: read each needed file once, then slice
        pairs: list[IdxPair] = self._extra["pairs"]
        file_of = self._extra["file_of"][table.index.to_numpy()]
        item_of = self._extra["item_of"][table.index.to_numpy()]
        arrays: dict[int, np.ndarray] = {}
        for f in np.unique(file_of):
            arr, _ = read_idx(pairs[int(f)].images)
            if arr.ndim != 3:
                raise DataError(f"{pairs[int(f)].images} holds {arr.ndim}-D data, expected (N, H, W) images")
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            arrays[int(f)] = arr

        def load_idx(pos: int) -> np.ndarray:
            arr = arrays[int(file_of[pos])]
            i = int(item_of[pos])
            if i >= len(arr):
                raise ImageDecodeError("truncated idx file (image data missing)")
            img = arr[i]
            if img.shape != (image_size, image_size):
                pil = Image.fromarray(img, "L")
                w, h = pil.size
                if w != h:
                    side = min(w, h)
                    pil = pil.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
                img = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
            if channels == 3:
                return np.repeat(img[:, :, None], 3, axis=2)
            return img[:, :, None]

        return load_idx


# ------------------------------------------------------------------------------------------ resolve
def resolve_source(source: str) -> Source:
    source = os.fspath(source)
    if source.startswith(BUILTIN_PREFIX):
        return _builtin_source(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"no such file or folder: {source}")
    path = path.resolve()
    if path.is_dir():
        pairs = find_idx_pairs(path)
        if pairs:
            return _idx_source(path, pairs)
        return _folder_source(path)
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"cannot use {source} as a source: expected a folder, a .csv/.parquet manifest or builtin:NAME"
        )
    return _manifest_source(path, kind)


def _builtin_source(source: str) -> Source:
    ds, params = parse_builtin(source)
    table = ds.table(**params)
    return Source("builtin", canonical_builtin(ds, params), None, table, {"dataset": ds, "params": params})


def _folder_source(root: Path) -> Source:
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                rels.append(rel.replace(os.sep, "/"))
    if not rels:
        raise DataError(f"no images found under {root}")
    rels.sort()
    table = pd.DataFrame({"path": rels})
    parts = [r.split("/") for r in rels]
    if all(len(p) >= 2 for p in parts):
        table["label"] = [p[0] for p in parts]
    files = [str(root / r) for r in rels]
    return Source("folder", str(root), root, table, {"files": files})


def _manifest_source(path: Path, kind: str) -> Source:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {_one_line(exc)}") from None
    try:
        if kind == "csv":
            table = pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", dtype={"path": str}, low_memory=False)
        else:
            table = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many kinds
        raise DataError(f"cannot read manifest {path}: {type(exc).__name__}: {_one_line(exc)}") from None
    if "path" not in table.columns:
        cols = ", ".join(str(c) for c in table.columns)
        raise DataError(f"manifest {path} has no 'path' column (columns: {cols})")
    if len(table) == 0:
        raise DataError(f"no images found under {path} (the manifest lists no rows)")
    table = table[["path"] + [c for c in table.columns if c != "path"]].reset_index(drop=True)
    table.columns = [str(c) for c in table.columns]
    root = path.parent
    files: list[str | None] = []
    for p in table["path"].tolist():
        if p is None or (isinstance(p, float) and np.isnan(p)) or (isinstance(p, str) and not p.strip()):
            files.append(None)
            continue
        p = os.fsdecode(p) if isinstance(p, bytes) else str(p)
        files.append(os.path.join(root, os.path.expanduser(p)))
    extra = {"files": files, "manifest_sha256": hashlib.sha256(data).hexdigest()}
    return Source("manifest", str(path), root, table, extra)


def _idx_source(folder: Path, pairs: list[IdxPair]) -> Source:
    frames = []
    file_of, item_of = [], []
    for k, pair in enumerate(pairs):
        dtype, shape = read_idx_header(pair.images)
        if len(shape) != 3:
            raise DataError(f"{pair.images} holds {len(shape)}-D data, expected (N, H, W) images")
        n = shape[0]
        if pair.labels is not None:
            labels, declared = read_idx(pair.labels)
            if labels.ndim != 1 or declared != n or len(labels) != n:
                raise DataError(
                    f"{pair.labels.name} has {declared} labels but {pair.images.name} has {n} images"
                )
            labels = labels.astype(np.int64)
        else:
            labels = np.full(n, -1, dtype=np.int64)
        name = pair.images.name
        frames.append(
            pd.DataFrame({"path": [f"{name}#{i}" for i in range(n)], "label": labels, "split": pair.split})
        )
        file_of.append(np.full(n, k, dtype=np.int64))
        item_of.append(np.arange(n, dtype=np.int64))
    table = pd.concat(frames, ignore_index=True)
    extra = {"pairs": pairs, "file_of": np.concatenate(file_of), "item_of": np.concatenate(item_of)}
    return Source("idx", str(folder), folder, table, extra)


# -------------------------------------------------------------------------------------------- where
def parse_where(where: Sequence[str]) -> dict[str, list[str]]:
    if isinstance(where, str):
        where = [where]
    wanted: dict[str, list[str]] = {}
    for item in where:
        if "=" not in item:
            raise DataError(f"bad --where item {item!r}: expected COLUMN=VALUE")
        col, value = item.split("=", 1)
        col = col.strip()
        if not col:
            raise DataError(f"bad --where item {item!r}: expected COLUMN=VALUE")
        wanted.setdefault(col, []).append(value.strip())
    return wanted


def normalised_where(where: Sequence[str]) -> list[str]:
    return sorted(f"{c}={v}" for c, vs in parse_where(where).items() for v in set(vs))


def apply_where(table: pd.DataFrame, where: Sequence[str]) -> pd.DataFrame:
    """Rows whose column's string form equals a VALUE: OR within a column, AND across columns.
    Keeps the original index labels (the caller resets them)."""
    wanted = parse_where(where)
    if not wanted:
        return table
    mask = np.ones(len(table), dtype=bool)
    for col, values in wanted.items():
        if col not in table.columns:
            raise DataError(
                f"unknown column {col!r} in --where (available: {', '.join(map(str, table.columns))})"
            )
        as_text = table[col].astype(object).map(str)
        mask &= as_text.isin(values).to_numpy()
    if not mask.any():
        raise DataError(f"no rows left after --where {' '.join(where)} ({len(table)} rows before)")
    return table[mask]
