"""The decoded-image store: ``cache_root()/<fingerprint>/`` with

- ``images.npy``   uint8 (N, H, W, C), read back memory-mapped
- ``rows.parquet`` the N kept rows of the source table
- ``skipped.csv``  ``path,reason`` for the rows that could not be read
- ``meta.json``    written last; a store without it is not a store

A store is built in a temporary sibling folder and renamed into place in one step, so a crash never
leaves a half store that looks complete, and two builders of the same key cannot corrupt each other
(the second waits on a lock file where the platform has ``flock``, and in any case the loser of the
final rename drops its copy and uses the winner's).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from debias.errors import DataError

__all__ = ["FORMAT_VERSION", "cache_root", "make_fingerprint", "Store", "load_store", "build_store", "load_row"]

FORMAT_VERSION = 1
_STALE_TMP_S = 24 * 3600


def cache_root() -> Path:
    """``$DEBIAS_CACHE_DIR`` if set, else ``~/.cache/debias``."""
    env = os.environ.get("DEBIAS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "debias"


def make_fingerprint(
    kind: str, canonical: str, identity: str, where: list[str], image_size: int, channels: int
) -> str:
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "kind": kind,
            "source": canonical,
            "content": identity,
            "where": sorted(where),
            "image_size": int(image_size),
            "channels": int(channels),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class Store:
    path: Path
    images: np.ndarray
    table: pd.DataFrame
    skipped: pd.DataFrame
    meta: dict[str, Any]
    built: bool = False  # True when this call decoded the images


# ------------------------------------------------------------------------------------------- reading
def load_store(path: Path, image_size: int | None = None, channels: int | None = None) -> Store | None:
    """The store at ``path``, or None if it is absent, incomplete or inconsistent."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            return None
        images = np.load(path / "images.npy", mmap_mode="r")
        table = pd.read_parquet(path / "rows.parquet")
        skipped = pd.read_csv(path / "skipped.csv", dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001 - anything unreadable means "rebuild"
        return None
    n = meta.get("n")
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != n or len(table) != n:
        return None
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        return None
    if channels is not None and images.shape[3] != channels:
        return None
    if list(skipped.columns) != ["path", "reason"]:
        return None
    return Store(path, images, table.reset_index(drop=True), skipped, meta)


# ------------------------------------------------------------------------------------------ building
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the atomic rename alone
        yield
        return
    try:
        f = open(path, "a+b")
    except OSError as exc:
        raise DataError(f"cannot write to the cache folder {path.parent}: {exc.strerror or exc}") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale(root: Path, fp: str) -> None:
    """Leftovers of earlier builds of this store (called under its lock): trash, build folders whose builder process
    is gone (``.FP.tmp-PID-*``: provably stale, whatever their age), and any build folder older than a day."""
    now = time.time()
    for p in root.glob(f".{fp}.*"):
        if p.is_dir():
            with contextlib.suppress(OSError):
                dead_builder = p.name.startswith(f".{fp}.tmp-") and not pid_alive(_tmp_pid(p.name, fp))
                if dead_builder or now - p.stat().st_mtime > _STALE_TMP_S or p.name.startswith(f".{fp}.trash-"):
                    shutil.rmtree(p, ignore_errors=True)


def _tmp_pid(name: str, fp: str) -> int | None:
    try:
        return int(name[len(f".{fp}.tmp-") :].split("-", 1)[0])
    except ValueError:
        return None


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists on this machine (unknown ids count as alive: nothing is removed)."""
    if pid is None or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _shrink_npy(path: Path, n_rows: int) -> None:
    """Cut an .npy file (C order) down to its first ``n_rows`` rows in place: rewrite the shape in
    the header (same header length, padded with spaces) and truncate the data."""
    with open(path, "r+b") as f:
        major, _minor = np.lib.format.read_magic(f)
        len_size = 2 if major == 1 else 4
        f.seek(8)
        (hlen,) = struct.unpack("<H" if len_size == 2 else "<I", f.read(len_size))
        start = 8 + len_size
        f.seek(0)
        np.lib.format.read_magic(f)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        assert not fortran and f.tell() == start + hlen
        new_shape = (n_rows, *shape[1:])
        text = repr(
            {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": new_shape}
        )
        if len(text) + 1 > hlen:
            raise RuntimeError("npy header does not fit")  # cannot happen: the shape only shrinks
        header = (text + " " * (hlen - len(text) - 1) + "\n").encode("latin1")
        f.seek(start)
        f.write(header)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.truncate(start + hlen + n_rows * row_bytes)


def _reserve(npy: Path, final: Path) -> None:
    """Allocate the whole (sparse) .npy now: a full disk is then a clear error here rather than a
    SIGBUS later, when a page of the memory map is first written."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = npy.stat().st_size
    fd = os.open(npy, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(
                f"not enough disk space for the cache store {final} ({size / 1e6:.0f} MB needed)"
            ) from None
        # not supported by this file system: carry on with the sparse file
    finally:
        os.close(fd)


def _compact(mm: np.ndarray, kept: np.ndarray, block: int = 1024) -> None:
    """Move rows ``kept`` (sorted) to the front of ``mm``, in order, in place."""
    k = 0
    if len(kept) == 0:
        return
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    for run in np.split(kept, breaks):
        a, m = int(run[0]), len(run)
        if a != k:
            for off in range(0, m, block):
                c = min(block, m - off)
                mm[k + off : k + off + c] = mm[a + off : a + off + c]
        k += m


def _write_table(table: pd.DataFrame, path: Path) -> None:
    try:
        table.to_parquet(path, index=False)
        return
    except Exception:  # noqa: BLE001 - mixed-type object columns: store them as text
        pass
    fixed = table.copy()
    for col in fixed.columns:
        if fixed[col].dtype == object:
            fixed[col] = fixed[col].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v))
    fixed.to_parquet(path, index=False)


def _report_skipped(skipped: pd.DataFrame, limit: int = 20) -> None:
    if skipped.empty:
        return
    from rich.console import Console

    console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    for path, reason in skipped.head(limit).itertuples(index=False):
        console.print(f"skipped {path}: {reason}")
    if len(skipped) > limit:
        console.print(f"... and {len(skipped) - limit} more")


def _say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(text)


def report_skipped(skipped: pd.DataFrame) -> None:
    """Print ``skipped PATH: REASON`` to stderr, at most 20 lines then ``... and K more``."""
    _report_skipped(skipped)


def load_row(
    loader: Callable[[int], np.ndarray], pos: int, expected: tuple[int, ...]
) -> tuple[np.ndarray | None, str]:
    """``(pixels, "")`` for a readable row, ``(None, reason)`` otherwise: one bad image never stops a job.
    The one place that turns a row into pixels or a skip reason (the cache builder and the Ray engine use it)."""
    try:
        arr = loader(pos)
        if arr.shape != expected:
            raise ValueError(f"decoder returned shape {arr.shape}, expected {expected}")
        return arr, ""
    except Exception as exc:  # noqa: BLE001 - any failure is a skip reason
        return None, getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _decode_all(
    mm: np.ndarray,
    loader: Callable[[int], np.ndarray],
    n: int,
    workers: int,
    progress: bool,
    what: str,
) -> dict[int, str]:
    """Fill ``mm[pos]`` for every pos; return {pos: reason} for the rows that failed."""
    expected = mm.shape[1:]
    chunk = max(1, min(64, n // max(1, workers * 8)))

    def run(start: int, stop: int) -> tuple[int, list[tuple[int, str]]]:
        errors = []
        for pos in range(start, stop):
            arr, reason = load_row(loader, pos, expected)
            if arr is None:
                errors.append((pos, reason))
            else:
                mm[pos] = arr
        return stop - start, errors

    failures: dict[int, str] = {}
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if console.is_terminal or console.is_jupyter:  # a live bar only where it can redraw
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("images"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
    with contextlib.ExitStack() as stack:
        task = None
        if bar is not None:
            stack.enter_context(bar)
            task = bar.add_task(f"decoding {what}", total=n)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="debias-decode")
        try:
            pending = {pool.submit(run, s, min(s + chunk, n)) for s in range(0, n, chunk)}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    count, errors = fut.result()
                    failures.update(errors)
                    if bar is not None:
                        bar.advance(task, count)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return failures


def build_store(
    root: Path,
    fp: str,
    table: pd.DataFrame,
    loader: Callable[[int], np.ndarray],
    *,
    image_size: int,
    channels: int,
    workers: int,
    progress: bool,
    meta: dict[str, Any],
    what: str = "",
) -> Store:
    """Decode every row of ``table`` (RangeIndex) with ``loader`` into a new store ``root/fp``, or
    return the store another builder finished meanwhile."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the cache folder {root}: {exc.strerror or exc}") from None
    final = root / fp
    with _lock(root / f".{fp}.lock"):
        existing = load_store(final, image_size, channels)
        if existing is not None:
            return existing
        _remove_stale(root, fp)
        if final.exists():  # leftover that is not a valid store: move it out of the way
            trash = root / f".{fp}.trash-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(OSError):
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
        tmp = root / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            n = len(table)
            t0 = time.perf_counter()
            npy = tmp / "images.npy"
            mm = np.lib.format.open_memmap(
                npy, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, channels)
            )
            _reserve(npy, final)
            failures = _decode_all(mm, loader, n, max(1, int(workers)), progress, what or f"{n} images")
            kept = np.array([i for i in range(n) if i not in failures], dtype=np.int64)
            paths = table["path"].tolist()
            skipped = pd.DataFrame(
                {
                    "path": ["" if _isna(paths[i]) else str(paths[i]) for i in sorted(failures)],
                    "reason": [failures[i] for i in sorted(failures)],
                },
                columns=["path", "reason"],
            )
            if len(kept) == 0:
                del mm
                first = f" (first: {skipped.path[0]}: {skipped.reason[0]})" if len(skipped) else ""
                _report_skipped(skipped)
                raise DataError(f"none of the {n} images could be read{first}")
            if failures:
                _compact(mm, kept)
            mm.flush()
            del mm
            if failures:
                _shrink_npy(npy, len(kept))
            _write_table(table.iloc[kept].reset_index(drop=True), tmp / "rows.parquet")
            skipped.to_csv(tmp / "skipped.csv", index=False)
            elapsed = time.perf_counter() - t0
            if progress:
                _say(
                    f"decoded {len(kept)} images in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.0f} images/s)"
                    + (f", {len(skipped)} skipped" if len(skipped) else "")
                    + f" -> {final}"
                )
            full_meta = {
                **meta,
                "format": FORMAT_VERSION,
                "fingerprint": fp,
                "n": int(len(kept)),
                "n_skipped": int(len(skipped)),
                "image_size": int(image_size),
                "channels": int(channels),
                "decode_seconds": round(elapsed, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(full_meta, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.rename(tmp, final)
            except OSError:
                # someone else (without flock) put a store there first: use theirs if it is valid
                store = load_store(final, image_size, channels)
                if store is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return store
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    store = load_store(final, image_size, channels)
    if store is None:  # pragma: no cover - we just wrote it
        raise DataError(f"cache store {final} could not be read back")
    store.built = True
    return store


def _isna(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)
