"""Prometheus metrics of one service instance (its own registry, so several apps in one process do not clash)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # `debias serve --workers N`: every process keeps its own metrics and drift window; this names the process
        # that answered a scrape, so that a scraper can tell the workers apart (or sum them).
        Gauge("debias_worker", "The worker process these metrics belong to.", ["process_id"], registry=r).labels(
            str(os.getpid())).set(1)
        self.requests = Counter(
            "debias_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "debias_http_request_duration_seconds", "Time to answer a request.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "debias_model_batch_size", "Images per model batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "debias_model_batch_duration_seconds", "Model time per batch (decode on device, encode, score).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter("debias_images_scored", "Images scored.", registry=r)
        self.novel = Counter("debias_images_novel", "Images flagged novel (p-value <= target FPR).", registry=r)
        self.novel_fraction = Gauge(
            "debias_novel_fraction", "Fraction of the recent window (drift window) flagged novel.", registry=r
        )
        self.rejected = Counter("debias_files_rejected", "Uploaded files refused, by reason kind.", ["kind"], registry=r)
        self.queue_images = Gauge("debias_queue_images", "Images waiting for or in the model.", registry=r)
        self.decode_pixels = Gauge("debias_decode_pixels", "Pixels decoding now, across all requests.", registry=r)
        self.decode_pixels_peak = Gauge(
            "debias_decode_pixels_peak", "Most pixels ever decoding at once (bounded by the decode budget).", registry=r
        )
        self.decode_busy = Counter(
            "debias_decode_busy", "Requests answered 503 because the decode budget stayed full.", registry=r
        )
        self.ready = Gauge("debias_ready", "1 once the model is loaded and warmed up.", registry=r)
