"""Micro-batching: requests from many clients share one model batch, run by one model-owner thread.

Request handlers ``await submit(payload, size)``; the owner thread takes the first waiting job, then keeps taking
jobs until the batch holds ``max_batch_size`` images or ``max_wait_ms`` has passed since it took the first, runs
``process`` on all of them at once and hands each job its own result. While a batch runs, new jobs queue up and
form the next batch, so under load batches fill without any waiting. The event loop never runs model code: it only
puts jobs on a queue and awaits futures that the owner thread completes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More images are waiting than ``max_queue_images``: the caller should answer 503 and let the client retry."""


@dataclass
class _Job:
    payload: Any
    size: int
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """``process(payloads) -> results`` (one result per payload; an Exception instance fails only its own job)."""

    def __init__(
        self,
        process: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_images: int,
        name: str = "debias-model-owner",
    ) -> None:
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0  # images queued or running
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def pending_images(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    async def submit(self, payload: Any, size: int) -> Any:
        with self._lock:
            if self._pending + size > self.max_queue_images and self._pending > 0:
                raise QueueFull(f"{self._pending} images are waiting for the model (limit {self.max_queue_images})")
            self._pending += size
        job = _Job(payload, size)
        self._queue.put(job)
        # Cancelling this await (client gone) cancels the job's future; the owner then skips the job.
        return await asyncio.wrap_future(job.future)

    # -- the owner thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        carry: Any = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                return
            batch, n = [first], first.size
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or n + nxt.size > self.max_batch_size:
                    carry = nxt  # starts the next batch (or stops after this one)
                    break
                batch.append(nxt)
                n += nxt.size
            self._execute(batch)

    def _execute(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        try:
            if live:
                try:
                    results = self.process([job.payload for job in live])
                except BaseException as exc:  # noqa: BLE001 - the jobs' awaiters get the error; the thread lives on
                    results = [exc] * len(live)
                for job, result in zip(live, results):
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
        finally:
            with self._lock:
                self._pending -= sum(job.size for job in batch)
