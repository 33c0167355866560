"""The scoring engine behind the routes: loads the detector in the background, decodes uploads, feeds the
micro-batcher and keeps the recent scores for drift. Everything model-related is done by :mod:`debias`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from debias.data.gpu_decode import decode_jpegs_on_device, gpu_jpeg_available, is_jpeg
from debias.data.intake import UploadError, decode_upload, probe_upload
from debias.density.calibration import drift_report
from debias.density.detector import FittedDetector, NoveltyResults, open_detector
from debias.runtime.device import resolve_device, set_precision
from debias.service.batcher import MicroBatcher
from debias.service.decode_budget import DecodeBusy, DecodePool, PixelBudget
from debias.service.prometheus_metrics import ServiceMetrics
from debias.service.settings import Settings

log = logging.getLogger("debias.service")

#: Uploads with at most this many pixels in all are decoded in the event loop (about a millisecond of Pillow work).
INLINE_DECODE_PIXELS = 128 * 128


class BadUploads(Exception):
    """Uploads that reached the model owner but cannot be scored: ``problems`` = [(index, UploadError)]."""

    def __init__(self, problems: list[tuple[int, UploadError]]) -> None:
        super().__init__(f"{len(problems)} unusable files")
        self.problems = problems


@dataclass
class _Payload:
    images: list[np.ndarray | bytes]  # decoded (S, S, C) uint8, or JPEG bytes to decode on the GPU
    keep_recon: bool


#: How a payload reaches the model: ``await submit(payload, n_images)`` -> its NoveltyResults. By default the engine's
#: own micro-batcher thread; under Ray Serve a ``@serve.batch`` method of the deployment (service/ray_serve.py), which
#: calls :meth:`ScoringEngine.process_batch` itself.
Submit = Callable[[Any, int], Awaitable[Any]]


class ScoringEngine:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, submit: Submit | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._submit = submit
        self.state = "starting"  # starting -> loading -> ready | failed
        self.error: str | None = None
        self.detector: FittedDetector | None = None
        self.batcher: MicroBatcher | None = None
        self.gpu_jpeg = False
        self.recent: deque[float] = deque(maxlen=settings.drift_window)
        # the novel flags of the same window and their count: the gauge is updated per request in O(images), not
        # by re-deciding the whole window (which cost 1.5 % of the server's Python time at 64 clients)
        self._recent_novel: deque[bool] = deque(maxlen=settings.drift_window)
        self._novel_in_window = 0
        self.decode_budget = PixelBudget(settings.decode_budget_pixels)
        self.decode_pool = DecodePool(settings.decode_threads)
        self._loader = threading.Thread(target=self._load, name="debias-loader", daemon=True)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- life cycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load (and if needed fit) in the background, so /healthz answers at once and /readyz says when it is done.
        Idempotent: a test harness may run the app's lifespan more than once."""
        if not self._loader.is_alive() and self.state == "starting":
            self._loader.start()

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.decode_pool.shutdown()

    def _load(self) -> None:
        s = self.settings
        try:
            self.state = "loading"
            if s.torch_threads is not None:
                torch.set_num_threads(s.torch_threads)
            set_precision(s.precision)  # per process: each --workers process sets it from its settings
            device = resolve_device(s.device)
            det = open_detector(
                s.model_dir, device=device, fit_data=s.fit_data, fit_where=s.fit_where or None,
                target_fpr=s.target_fpr, progress=False,
            )
            self.gpu_jpeg = s.gpu_jpeg and gpu_jpeg_available(device)
            # Warm-up: the first batches of each size pay for allocator and kernel set-up; do it before /readyz.
            c, size = det.channels, det.image_size
            for n in sorted({1, s.max_batch_size}):
                det.score_batch(torch.zeros(n, c, size, size), top_k=s.top_k)
            self.detector = det
            if self._submit is None:
                self.batcher = MicroBatcher(
                    self.process_batch, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                    max_queue_images=s.max_queue_images,
                )
                self.batcher.start()
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info("model %s ready on %s (calibration %d images, threshold %s)", s.model_dir, device,
                     det.calibrator.n_calibration_, det.card.get("threshold"))
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; the process stays up for inspection
            self.state = "failed"
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("cannot load the model: %s", self.error)

    # -- request path ----------------------------------------------------------------------------------------------
    async def prepare(self, blobs: Sequence[bytes]) -> list[np.ndarray | bytes | UploadError]:
        """Check and decode uploads; one outcome per blob, in order: the pixels, JPEG bytes for the GPU, or why the
        file cannot be scored. Headers are checked in the event loop (microseconds); small images are decoded there
        too, since a thread hop costs more than decoding a few thousand pixels. Anything bigger holds the request's
        pixels from the server-wide budget while it decodes on the decode threads; a request that finds no room
        within ``decode_wait_s`` raises :class:`DecodeBusy` (503)."""
        s = self.settings
        outcome: list[np.ndarray | bytes | UploadError | None] = [None] * len(blobs)
        pixels: dict[int, int] = {}
        for i, data in enumerate(blobs):
            try:
                info = probe_upload(data, max_pixels=s.max_pixels, max_bytes=s.max_file_bytes, formats=s.formats)
                pixels[i] = info.width * info.height
            except UploadError as exc:
                outcome[i] = exc
        if self.gpu_jpeg:  # JPEGs go to the GPU undecoded; the budget is for CPU memory
            for i in [i for i in pixels if is_jpeg(blobs[i])]:
                outcome[i] = blobs[i]
                del pixels[i]
        if sum(pixels.values()) <= INLINE_DECODE_PIXELS:
            for i in pixels:
                outcome[i] = self._decode_one(blobs[i])
        elif pixels:
            for i, got in zip(pixels, await self._decode_budgeted([blobs[i] for i in pixels], list(pixels.values()))):
                outcome[i] = got
        for got in outcome:
            if isinstance(got, UploadError):
                self.metrics.rejected.labels(got.kind).inc()
        return outcome  # type: ignore[return-value]

    async def _decode_budgeted(self, blobs: list[bytes], pixels: list[int]) -> list[np.ndarray | UploadError]:
        """Hold the request's pixels (at most the whole budget) while its images decode: all at once when they fit,
        else one after another, so that the pixels decoding at once never exceed the budget."""
        budget = self.decode_budget
        try:
            taken = await budget.acquire(sum(pixels), self.settings.decode_wait_s)
        except DecodeBusy:
            self.metrics.decode_busy.inc()
            raise
        self.metrics.decode_pixels.set(budget.in_use)
        self.metrics.decode_pixels_peak.set(budget.peak)
        try:
            if sum(pixels) <= taken:
                jobs = [self.decode_pool.run(partial(self._decode_one, b), n) for b, n in zip(blobs, pixels)]
                return list(await asyncio.gather(*jobs))
            return [await self.decode_pool.run(partial(self._decode_one, b), n) for b, n in zip(blobs, pixels)]
        finally:
            budget.release(taken)
            self.metrics.decode_pixels.set(budget.in_use)

    def _decode_one(self, data: bytes) -> np.ndarray | UploadError:
        det = self.detector
        assert det is not None
        s = self.settings
        try:
            return decode_upload(data, det.image_size, det.channels, max_pixels=s.max_pixels,
                                 max_bytes=s.max_file_bytes, formats=s.formats, probed=True)
        except UploadError as exc:
            return exc

    async def score(self, images: list[np.ndarray | bytes], keep_recon: bool = False) -> NoveltyResults:
        if self._submit is not None:
            res: NoveltyResults = await self._submit(_Payload(images, keep_recon), len(images))
        else:
            assert self.batcher is not None
            self.metrics.queue_images.set(self.batcher.pending_images + len(images))
            res = await self.batcher.submit(_Payload(images, keep_recon), len(images))
        self.metrics.images.inc(len(res))
        self.metrics.novel.inc(int(res.is_novel.sum()))
        for value, novel in zip(res.novelty.tolist(), res.is_novel.tolist()):
            if len(self._recent_novel) == self._recent_novel.maxlen:
                self._novel_in_window -= self._recent_novel[0]  # the flag the append below pushes out
            self.recent.append(value)
            self._recent_novel.append(bool(novel))
            self._novel_in_window += bool(novel)
        if self.recent:
            self.metrics.novel_fraction.set(self._novel_in_window / len(self.recent))
        return res

    def drift(self) -> dict[str, Any]:
        assert self.detector is not None
        return drift_report(np.fromiter(self.recent, float), self.detector.calibrator)

    # -- the model-owner thread ------------------------------------------------------------------------------------
    def _to_tensor(self, images: list[np.ndarray | bytes]) -> torch.Tensor:
        det = self.detector
        assert det is not None
        arrays = [a for a in images if isinstance(a, np.ndarray)]
        jpegs = [b for b in images if isinstance(b, bytes)]
        if not jpegs:
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            return x.to(det.device, non_blocking=True).float().div_(255.0)
        s = self.settings

        def cpu(b: bytes) -> np.ndarray:
            return decode_upload(b, det.image_size, det.channels, max_pixels=s.max_pixels, formats=s.formats)

        decoded = iter(decode_jpegs_on_device(jpegs, det.image_size, det.channels, det.device, cpu))
        parts = []
        for a in images:
            if isinstance(a, bytes):
                parts.append(next(decoded))
            else:
                parts.append(torch.from_numpy(a).permute(2, 0, 1).to(det.device).float().div_(255.0))
        return torch.stack(parts)

    def process_batch(self, payloads: Sequence[_Payload]) -> list[NoveltyResults | BaseException]:
        det = self.detector
        assert det is not None
        t0 = time.perf_counter()
        tensors: list[torch.Tensor | None] = []
        results: list[NoveltyResults | BaseException] = []
        for p in payloads:
            try:
                tensors.append(self._to_tensor(p.images))
                results.append(RuntimeError("not scored"))
            except Exception as exc:  # noqa: BLE001 - one bad payload must not fail its batch-mates
                tensors.append(None)
                results.append(BadUploads([(0, exc if isinstance(exc, UploadError) else UploadError("corrupt", str(exc)))]))
        good = [i for i, t in enumerate(tensors) if t is not None]
        if not good:
            return results
        x = torch.cat([tensors[i] for i in good])  # type: ignore[misc]
        keep = any(payloads[i].keep_recon for i in good)
        chunks = [
            det.score_batch(x[a : a + self.settings.max_batch_size], top_k=self.settings.top_k, keep_recon=keep)
            for a in range(0, len(x), self.settings.max_batch_size)
        ]
        res = _concat(chunks)
        self.metrics.batch_size.observe(len(x))
        start = 0
        for i in good:
            n = len(tensors[i])  # type: ignore[arg-type]
            results[i] = _take(res, start, start + n, payloads[i].keep_recon)
            start += n
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        return results


def _concat(parts: list[NoveltyResults]) -> NoveltyResults:
    if len(parts) == 1:
        return parts[0]
    return NoveltyResults(
        novelty=np.concatenate([p.novelty for p in parts]),
        p_value=np.concatenate([p.p_value for p in parts]),
        is_novel=np.concatenate([p.is_novel for p in parts]),
        rarity=np.concatenate([p.rarity for p in parts]),
        recon_error=np.concatenate([p.recon_error for p in parts]),
        top_dims=[d for p in parts for d in p.top_dims],
        driver=[d for p in parts for d in p.driver],
        statistics=[d for p in parts for d in p.statistics],
        recon=torch.cat([p.recon for p in parts]) if parts[0].recon is not None else None,
        images=torch.cat([p.images for p in parts]) if parts[0].images is not None else None,
    )


def _take(res: NoveltyResults, a: int, b: int, keep_recon: bool) -> NoveltyResults:
    return NoveltyResults(
        novelty=res.novelty[a:b],
        p_value=res.p_value[a:b],
        is_novel=res.is_novel[a:b],
        rarity=res.rarity[a:b],
        recon_error=res.recon_error[a:b],
        top_dims=res.top_dims[a:b],
        driver=res.driver[a:b],
        statistics=res.statistics[a:b],
        recon=res.recon[a:b] if keep_recon and res.recon is not None else None,
        images=res.images[a:b] if keep_recon and res.images is not None else None,
    )
