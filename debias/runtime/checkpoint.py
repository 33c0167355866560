"""Atomic checkpoint files and safe loading.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over the old one, so a
crash at any moment leaves either the previous checkpoint or the new one, never a torn file. Loading always uses
``weights_only=True``: checkpoints hold tensors, numbers, strings, lists and dicts only, and a file from elsewhere
cannot run code on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from debias.errors import DebiasError


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it,
    which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_dead_writers_tmp(path: Path) -> None:
    """Temporary files of earlier writes of ``path`` whose writer process is gone (killed mid-write): provably
    stale, since the name carries the writer's process id."""
    from debias.data.cache import pid_alive

    for p in path.parent.glob(f".{path.name}.*.tmp"):
        pid = p.name[len(f".{path.name}.") :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_tmp(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus the umask), so that a
        # run folder mounted into the Docker image is readable by its unprivileged user (issue 14, item 3).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_json(obj: Any, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_savefig(fig: Any, path: str | Path, **savefig_options: Any) -> None:
    """A matplotlib figure as a file (format from the suffix), written atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    _atomic_write(Path(path), lambda f: fig.savefig(f, format=fmt, **savefig_options))


def atomic_write_table(table: Any, path: str | Path) -> None:
    """A DataFrame as Parquet or CSV (by the suffix), written atomically: a reader never sees half a table."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        _atomic_write(p, lambda f: table.to_parquet(f, index=False))
    else:
        _atomic_write(p, lambda f: f.write(table.to_csv(index=False).encode("utf-8")))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a torn, foreign or tampered file: say so in one line
        raise DebiasError(f"cannot load checkpoint {path}: {str(exc).splitlines()[0]}") from exc


#: Training options that may change between a run and its resume: how long it runs and where, not what it learns.
RESUMABLE_CHANGES = ("epochs", "device", "max_steps", "max_minutes")


def resume_identity(config: Any) -> dict[str, Any]:
    """A training config as a checkpoint stores it for the resume check: every field but
    :data:`RESUMABLE_CHANGES`, tuples as lists (what a checkpoint gives back). ``config`` is the dataclass, or the dict
    an earlier checkpoint stored (checkpoints written before every loop stored this form kept all fields)."""
    d = {k: v for k, v in (config if isinstance(config, dict) else asdict(config)).items() if k not in RESUMABLE_CHANGES}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
