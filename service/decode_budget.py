"""A bound on the memory that decoding uploads takes across all requests (issue 14, item 1).

The per-image and per-request limits alone let 8 concurrent requests of 8 small 4096 x 4096 PNGs each decode 64
images at once: the server grew from 0.7 to 3.0 GB and kept 1 GB long after. Two things bound it now:

- :class:`PixelBudget`: a request holds its images' pixels (width x height from the headers; at most the whole
  budget, and then its images decode one at a time) while they decode. A request that does not fit waits (FIFO)
  up to ``wait_s``, then gets 503 with Retry-After.
- :class:`DecodePool`: decoding runs on a few dedicated threads, not the event loop's 40-thread pool, so only a few
  malloc arenas ever hold decode buffers, and the pool hands freed memory back to the system (``malloc_trim``) when
  the last large decode of a burst ends.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DecodeBusy(Exception):
    """The pixel budget stayed full for the whole wait."""


class PixelBudget:
    """Pixels that may be decoding at once, shared by every request of one event loop; waiters are served in order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the pixel budget must be positive")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int, wait_s: float) -> int:
        """Take ``pixels`` (at most the whole budget) and return what was taken; raise :class:`DecodeBusy` after
        ``wait_s`` seconds without room."""
        pixels = max(1, min(pixels, self.capacity))
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self._take(pixels)
            return pixels
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=wait_s)
        except asyncio.TimeoutError:
            if fut.done():  # granted in the same instant the wait ran out: keep it
                return pixels
            self._waiters.remove(entry)
            self._wake()  # a smaller waiter behind this one may fit now
            raise DecodeBusy(f"the server is decoding {self.in_use} pixels; the budget is {self.capacity}") from None
        except asyncio.CancelledError:
            if fut.done():
                self.release(pixels)
            elif entry in self._waiters:
                self._waiters.remove(entry)
            raise
        return pixels

    def release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._wake()

    def _wake(self) -> None:
        # First in, first served: the head waits until it fits, so a large image is not starved by small ones.
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            pixels, fut = self._waiters.popleft()
            if fut.done():
                continue
            self._take(pixels)
            fut.set_result(None)

    def _take(self, pixels: int) -> None:
        self.in_use += pixels
        self.peak = max(self.peak, self.in_use)


def _malloc_trim() -> Callable[[], None]:
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
        trim = libc.malloc_trim if libc is not None else None  # glibc only
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


class DecodePool:
    """``threads`` decode threads; after a burst of decoding of more than ``trim_after_pixels`` pixels ends, freed
    heap memory goes back to the system, so the server's RSS returns near its baseline after a load."""

    def __init__(self, threads: int, trim_after_pixels: int = 4_000_000) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="debias-decode")
        self._trim = _malloc_trim()
        self._lock = threading.Lock()
        self._running = 0
        self._since_trim = 0
        self.trim_after_pixels = trim_after_pixels
        self.trims = 0

    async def run(self, fn: Callable[[], T], pixels: int) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, pixels)

    def _call(self, fn: Callable[[], T], pixels: int) -> T:
        with self._lock:
            self._running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._running -= 1
                self._since_trim += pixels
                trim = self._running == 0 and self._since_trim > self.trim_after_pixels
                if trim:
                    self._since_trim = 0
                    self.trims += 1
            if trim:
                self._trim()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
