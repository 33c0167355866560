"""glibc's allocator (Linux): keep freed large blocks for reuse instead of handing them back to the system at once.

glibc serves every allocation above its mmap threshold (it adapts, but never above 32 MiB) with a fresh ``mmap`` and
unmaps it on ``free``. A training step whose activations are larger than that maps its memory anew every step and the
kernel zero-fills every page on first touch: on the first model of ``auto`` (64 channels at full resolution, batch 128,
32 px: 33.5 MB a feature map) 18 s of a 52 s process was kernel time, and an epoch took 6.0 s; with the thresholds
raised, 2 s and 3.7 s (docs/benchmarks.md, issue 17, "Session 11"). The price: a process keeps up to ``limit`` of
freed memory mapped, so its resident size stays near its peak.

The CLI calls :func:`retain_freed_memory` once at start; ``DEBIAS_MALLOC_TUNING=0`` turns that off, and a process
that sets glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) is left alone.
Library users may call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>: free memory at the top of the heap kept before it is returned
M_MMAP_THRESHOLD = -3  # <malloc.h>: allocations at least this large get their own mmap
DEFAULT_LIMIT = 1 << 30  # 1 GiB: above any one tensor debias's loops allocate at their default sizes
_USER_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def retain_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes; True if both took effect. Does nothing (False)
    off Linux, without glibc's ``mallopt`` (musl's is a stub that refuses), with ``DEBIAS_MALLOC_TUNING=0``, or when
    the environment already sets glibc's malloc knobs."""
    if not sys.platform.startswith("linux") or os.environ.get("DEBIAS_MALLOC_TUNING", "1") == "0":
        return False
    if any(k in os.environ for k in _USER_KNOBS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
