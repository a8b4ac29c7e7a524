"""Prometheus metrics of a server (one registry per app, so tests and replicas do not collide)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("overpaint_queue_depth", "jobs waiting to join the batch", registry=r)
        self.live_rows = Gauge("overpaint_live_rows", "model rows in the running batch", registry=r)
        self.rows_per_step = Histogram("overpaint_rows_per_step", "model rows per denoising step", registry=r,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.step_seconds = Histogram("overpaint_step_seconds", "time of one batched step", registry=r,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))
        self.request_seconds = Histogram("overpaint_request_seconds", "request latency", ["route", "method"],
                                         registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("overpaint_requests", "finished requests", ["route", "method", "status"], registry=r)
        self.errors = Counter("overpaint_errors", "errors by reason", ["reason"], registry=r)
        self.cache = Counter("overpaint_inversion_cache", "inversion cache lookups", ["result"], registry=r)
        self.device_memory = Gauge("overpaint_device_memory_bytes", "device memory allocated by torch", registry=r)

    def step(self, rows: int, seconds: float, device) -> None:
        self.rows_per_step.observe(rows)
        self.step_seconds.observe(seconds)
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            self.device_memory.set(torch.cuda.memory_allocated(device))

    def done(self, job) -> None:
        self.request_seconds.labels(job.route, job.method).observe(time.monotonic() - job.started)
        self.requests.labels(job.route, job.method, "200").inc()

    def error(self, job, error) -> None:
        self.errors.labels(error.code or str(error.status)).inc()
        if job is not None:
            self.requests.labels(job.route, job.method, str(error.status)).inc()

    def render(self, batcher=None) -> bytes:
        if batcher is not None:
            self.queue_depth.set(batcher.depth)
            self.live_rows.set(batcher.rows)
        return generate_latest(self.registry)
