"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, never share counters), in the text format at ``/metrics``."""
from __future__ import annotations

import resource
import sys

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from cryolens.operations import Operation

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The server's counters; also the inference worker's event sink."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, fds
        self.requests = Counter("cryolens_requests", "HTTP requests by endpoint and status",
                                ("endpoint", "method", "status"), registry=registry)
        self.latency = Histogram("cryolens_request_seconds", "HTTP request latency",
                                 ("endpoint",), buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_particles = Histogram(
            "cryolens_batch_particles", "Particles per engine call (after batching requests)",
            ("operation",), buckets=_BATCH_BUCKETS, registry=registry)
        self.batch_requests = Histogram(
            "cryolens_batch_requests", "Requests batched into one engine call", ("operation",),
            buckets=_BATCH_BUCKETS, registry=registry)
        self.model_seconds = Histogram(
            "cryolens_model_seconds", "Time in the model per engine call", ("operation",),
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.particles = Counter("cryolens_particles", "Particles run through the model",
                                 ("operation",), registry=registry)
        self.dropped_jobs = Counter(
            "cryolens_dropped_jobs", "Queued jobs never run: client disconnected or deadline "
            "passed", ("reason",), registry=registry)
        self.disconnects = Counter(
            "cryolens_client_disconnects", "Clients that left before their answer: during the "
            "upload, or while their job waited or ran", ("stage",), registry=registry)
        self.busy_parse = Counter(
            "cryolens_parse_budget_refusals", "Requests answered 503 because the server-wide "
            "parse budget stayed full", registry=registry)
        self.running_particles = Gauge(
            "cryolens_running_particles",
            "Particles in the engine call running now (0: the model is idle)", registry=registry)
        self.queue_depth = Gauge("cryolens_queue_depth", "Inference jobs waiting",
                                 registry=registry)
        self.in_flight = Gauge("cryolens_requests_in_flight", "HTTP requests being handled",
                               registry=registry)
        self.ready = Gauge("cryolens_ready", "1 once the model is loaded and warmed up",
                           registry=registry)
        self.peak_rss = Gauge("cryolens_peak_resident_memory_bytes",
                              "Peak resident memory of the process", registry=registry)
        self.gpu_memory = Gauge("cryolens_gpu_memory_allocated_bytes",
                                "CUDA memory allocated by the model (0 on a CPU)",
                                registry=registry)
        self.gpu_peak = Gauge("cryolens_gpu_memory_peak_bytes", "Peak CUDA memory allocated",
                              registry=registry)

    # -- worker events ------------------------------------------------------------------------
    def batch(self, operation: Operation, jobs: int, particles: int, seconds: float) -> None:
        self.batch_particles.labels(operation.kind).observe(particles)
        self.batch_requests.labels(operation.kind).observe(jobs)
        self.model_seconds.labels(operation.kind).observe(seconds)
        self.particles.labels(operation.kind).inc(particles)

    def dropped(self, reason: str) -> None:
        self.dropped_jobs.labels(reason).inc()

    def running(self, particles: int) -> None:
        self.running_particles.set(particles)

    def disconnected(self, stage: str) -> None:
        self.disconnects.labels(stage).inc()

    # -- scrape -------------------------------------------------------------------------------
    def render(self, queue_depth: int, ready: bool, device_type: str | None) -> bytes:
        self.queue_depth.set(queue_depth)
        self.ready.set(1 if ready else 0)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB here
        self.peak_rss.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
        torch = sys.modules.get("torch")  # the engine loaded it; this layer never imports it
        if device_type == "cuda" and torch is not None:
            self.gpu_memory.set(torch.cuda.memory_allocated())
            self.gpu_peak.set(torch.cuda.max_memory_allocated())
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
