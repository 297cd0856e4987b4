"""Prometheus metrics, defined once. Doors record requests; the engine records the rest.

Served on the metrics port (8082) by `metrics_app()`. Names are prefixed `detserve_`.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets from 1 ms to 60 s: CPU detectors sit in the 10 ms - 2 s range.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)

REQUESTS = Counter(
    "detserve_requests", "Requests answered, by model, protocol and status code.",
    ["model", "protocol", "code"], registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "detserve_request_latency_seconds", "End-to-end latency seen by the front process.",
    ["model", "protocol"], buckets=_LATENCY, registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "detserve_queue_wait_seconds", "Time from enqueue to dispatch to a worker.",
    ["model"], buckets=_LATENCY, registry=REGISTRY,
)
STAGE_LATENCY = Histogram(
    "detserve_stage_latency_seconds", "Per-image time in each worker stage (decode, preprocess, inference, postprocess).",
    ["model", "stage"], buckets=_LATENCY, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "detserve_batch_size", "Images per batch dispatched to a worker.",
    ["model"], buckets=_BATCH, registry=REGISTRY,
)
BATCH_PROTOCOLS = Counter(
    "detserve_batch_items", "Items dispatched, by the protocol mix of their batch ('mixed' when several doors share one).",
    ["model", "protocol", "batch_mix"], registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("detserve_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=REGISTRY)
IN_FLIGHT = Gauge("detserve_in_flight", "Requests dispatched to workers and not yet answered.", ["model"], registry=REGISTRY)
LIVE_WORKERS = Gauge("detserve_live_workers", "Workers that are ready or busy.", ["model"], registry=REGISTRY)
WORKER_RESTARTS = Counter("detserve_worker_restarts", "Workers restarted after a crash or a missed heartbeat.", ["model"], registry=REGISTRY)
REJECTED = Counter("detserve_rejected", "Requests refused before running, by reason.", ["model", "reason"], registry=REGISTRY)
GPU_MEMORY_ALLOCATED = Gauge("detserve_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per worker device.", ["model", "device"], registry=REGISTRY)
GPU_MEMORY_RESERVED = Gauge("detserve_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved per worker device.", ["model", "device"], registry=REGISTRY)
OOM_SPLITS = Counter("detserve_oom_batch_splits", "Batches split in half after a CUDA out-of-memory error.", ["model"], registry=REGISTRY)


# A not-found model name is chosen by the client: recording it verbatim would let any client grow
# the metric's label set without bound, so every door's not-found requests share one label.
_NOT_FOUND_CODES = ("404", "NOT_FOUND")
UNKNOWN_MODEL = "_unknown"


def record_request(model: str, protocol: str, code: int | str, seconds: float | None) -> None:
    code = str(code)
    if code in _NOT_FOUND_CODES:
        model = UNKNOWN_MODEL
    REQUESTS.labels(model, protocol, code).inc()
    if seconds is not None:
        REQUEST_LATENCY.labels(model, protocol).observe(seconds)


def render_latest() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
