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
# Label Studio pre-annotation jobs. Labels are model names (loaded models only), job origins and
# fixed state names: never job ids, which grow without bound.
LS_JOBS_STARTED = Counter("detserve_labelstudio_jobs_started", "Pre-annotation jobs created, by origin (api, on_import, cli).", ["model", "origin"], registry=REGISTRY)
LS_JOBS_FINISHED = Counter("detserve_labelstudio_jobs_finished", "Pre-annotation jobs ended, by final state (done, failed, cancelled).", ["model", "state"], registry=REGISTRY)
LS_JOB_TASKS = Counter("detserve_labelstudio_job_tasks", "Tasks finished by pre-annotation jobs, by outcome (done, skipped, failed).", ["model", "outcome"], registry=REGISTRY)
LS_JOBS_ACTIVE = Gauge("detserve_labelstudio_jobs_active", "Pre-annotation jobs queued, listing, running or paused.", ["model"], registry=REGISTRY)
LS_JOB_PROGRESS = Gauge("detserve_labelstudio_job_progress_ratio", "Finished share (0-1) of the tasks of the model's unfinished jobs; 1 when none.", ["model"], registry=REGISTRY)
OOM_SPLITS = Counter("detserve_oom_batch_splits", "Batches split in half after a CUDA out-of-memory error.", ["model"], registry=REGISTRY)

_PER_MODEL = (REQUESTS, REQUEST_LATENCY, QUEUE_WAIT, STAGE_LATENCY, BATCH_SIZE, BATCH_PROTOCOLS, QUEUE_DEPTH,
              IN_FLIGHT, LIVE_WORKERS, WORKER_RESTARTS, REJECTED, GPU_MEMORY_ALLOCATED, GPU_MEMORY_RESERVED,
              LS_JOBS_STARTED, LS_JOBS_FINISHED, LS_JOB_TASKS, LS_JOBS_ACTIVE, LS_JOB_PROGRESS, OOM_SPLITS)


# A not-found model name is chosen by the client: recording it verbatim would let any client grow
# the metric's label set without bound, so every door's not-found requests share one label.
_NOT_FOUND_CODES = ("404", "NOT_FOUND")
UNKNOWN_MODEL = "_unknown"


# `labels()` takes a lock and hashes the label tuple on every call (~2 us); the request path looks
# children up here instead. Bounded so that it can never grow with client-chosen names.
_CHILDREN_CACHE_LIMIT = 4096
_request_children: dict[tuple[str, str, str], tuple] = {}


def record_request(model: str, protocol: str, code: int | str, seconds: float | None) -> None:
    code = str(code)
    if code in _NOT_FOUND_CODES:
        model = UNKNOWN_MODEL
    key = (model, protocol, code)
    children = _request_children.get(key)
    if children is None:
        children = (REQUESTS.labels(model, protocol, code), REQUEST_LATENCY.labels(model, protocol))
        if len(_request_children) < _CHILDREN_CACHE_LIMIT:
            _request_children[key] = children
    children[0].inc()
    if seconds is not None:
        children[1].observe(seconds)


def forget_model(model: str) -> None:
    """Drop every series of an unloaded model. Left behind, `detserve_live_workers{model} 0` reads as
    an outage to an alert rule long after the model was removed on purpose; and a model loaded again
    under the name must get live children, not the cached ones of the removed series."""
    for metric in _PER_MODEL:
        metric.remove_by_labels({"model": model})
    for key in [key for key in _request_children if key[0] == model]:
        del _request_children[key]


class ModelMetrics:
    """The engine's per-model metric children, looked up once per model instead of per item."""

    def __init__(self, model: str):
        self.model = model
        self.queue_wait = QUEUE_WAIT.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.queue_depth = QUEUE_DEPTH.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)
        self.stages = {stage: STAGE_LATENCY.labels(model, stage)
                       for stage in ("decode", "preprocess", "inference", "postprocess")}
        self._batch_items: dict[tuple[str, str], object] = {}

    def batch_item(self, protocol: str, mix: str):
        key = (protocol, mix)
        child = self._batch_items.get(key)
        if child is None:  # protocols and mixes are a small closed set
            child = self._batch_items[key] = BATCH_PROTOCOLS.labels(self.model, protocol, mix)
        return child


def render_latest() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
