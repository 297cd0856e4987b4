"""Typed messages across the front-process <-> worker boundary (pickled over a multiprocessing Pipe).

Front -> worker: BatchRequest, Shutdown. Worker -> front: WorkerReady, BatchResult, Heartbeat,
WorkerError. Images travel as the client's bytes (EncodedImage) or raw pixels (RawImage). Large
payloads are written once into the worker's shared-memory arena (process.py) and travel as an
`ArenaBytes` reference in place of the bytes; small ones and any that do not fit are pickled inline.
"""
from __future__ import annotations

import copyreg
import dataclasses
import io
import operator
import pickle
from dataclasses import dataclass, field

from ..errors import DetserveError
from ..types import DetectOptions, DetectResult, Detection, EncodedImage, ImageInput, RawImage, RLEMask, StageTimes


@dataclass(frozen=True, slots=True)
class ArenaBytes:
    """Stands in for `EncodedImage.data` / `RawImage.pixels`: `length` bytes at `offset` of the
    worker's arena, valid until the worker answers the batch that carries it."""

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ArenaSpec:
    """Where a worker maps its arena: a memfd of the front process, opened via /proc."""

    path: str
    size: int


@dataclass(frozen=True, slots=True)
class WorkItem:
    item_id: int
    image: ImageInput
    options: DetectOptions


@dataclass(frozen=True, slots=True)
class BatchRequest:
    batch_id: int
    items: tuple[WorkItem, ...]
    threads: int = 0  # intra-op threads for this batch (elastic workers); 0: the worker's own


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One outcome per item of the request, in order. Stage times ride inside each DetectResult."""

    batch_id: int
    worker_id: int
    outcomes: tuple[DetectResult | DetserveError, ...]
    batch_size: int
    worker_seconds: float  # wall time in the worker for the whole batch
    oom_splits: int = 0  # times the batch was halved after a CUDA out-of-memory error


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the front process learns from a worker instead of importing torch itself."""

    name: str
    version: str
    arch: str
    classes: tuple[str, ...]
    has_masks: bool
    input_size: int
    device: str
    backend: str
    backend_reason: str = ""  # why this backend runs, e.g. backend = "auto" falling back to eager
    # The keep-ratio bound the family's transform uses (its default filled in); None for square inputs.
    resize_scale: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class WorkerReady:
    worker_id: int
    pid: int
    threads: int
    facts: ModelFacts
    arena_mapped: bool = False  # the worker mapped WorkerSpec.arena: the front may send ArenaBytes


@dataclass(frozen=True, slots=True)
class Heartbeat:
    worker_id: int
    sent_at: float  # worker's time.time(), for logs only (clocks differ across processes)
    gpu_memory_allocated: int | None = None  # bytes, CUDA devices only
    gpu_memory_reserved: int | None = None


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """A loading worker reached a new stage (backend auto's export, a parity check, which on CUDA
    includes a TensorRT engine build): its start timeout restarts, so each stage gets the whole
    `worker_start_timeout_s` while a worker stuck in one stage is still killed."""

    worker_id: int
    stage: str


@dataclass(frozen=True, slots=True)
class WorkerError:
    """The worker could not start (bad weights, bad device) or hit an error outside any batch."""

    worker_id: int
    message: str
    fatal: bool = True  # the worker exits after sending it


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Finish the current batch, close the predictor, exit."""

    reason: str = "stop"


DEFAULT_PREDICTOR_FACTORY = "service.pipeline.predictor:Predictor.from_config"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker process needs to build its predictor; pickled into the child once."""

    worker_id: int
    model_config: object  # service.settings.ModelConfig (kept loose: pydantic pickles fine)
    device: str  # "cpu", "cuda:N", or "auto" (the worker picks round-robin by `slot`)
    slot: int  # index among the model's workers, for GPU round-robin
    threads: int
    heartbeat_interval_s: float
    predictor_factory: str = DEFAULT_PREDICTOR_FACTORY
    extra: dict = field(default_factory=dict)  # factory keyword arguments (tests' fakes)
    arena: ArenaSpec | None = None  # set by WorkerProcess when shared memory is available
    start_timeout_s: float = 120.0  # worker_start_timeout_s: what the warm-up must fit in
    wide_threads: int = 0  # elastic: the threads a batch may ask for besides `threads` (0: none)
    environ: dict[str, str] | None = None  # the front's environment, applied first thing (None: keep)


ToWorker = BatchRequest | Shutdown
FromWorker = WorkerReady | BatchResult | Heartbeat | WorkerError


# ---- the wire: pickle, with the per-batch types reduced to their fields ---------------------
# A slots dataclass pickles through dataclasses' Python-level __getstate__/__setstate__ (a loop over
# fields() per object, per direction), and multiprocessing's ForkingPickler copies the whole copyreg
# table for every message. Reduced to (class, field values) by one fixed table instead, a batch of 8
# null-model requests pickled ~2x faster and its results unpickled ~3x faster (tests/unit/test_wire.py
# checks the round trip; bench/analysis.md has the served figures). Loading is plain pickle.loads.

def _by_fields(cls):
    get = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))
    if len(dataclasses.fields(cls)) == 1:
        return lambda obj: (cls, (get(obj),))
    return lambda obj: (cls, get(obj))


# Exact types only: a subclass (or any other object) pickles as it always did.
WIRE_TYPES = (BatchRequest, WorkItem, ArenaBytes, BatchResult, EncodedImage, RawImage, DetectOptions, DetectResult,
              StageTimes, Detection, RLEMask)


class _WirePickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, **{cls: _by_fields(cls) for cls in WIRE_TYPES}}


def dumps(message) -> bytes:
    """One message as bytes for a multiprocessing Connection (send_bytes; recv unpickles it)."""
    buffer = io.BytesIO()
    _WirePickler(buffer, pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


loads = pickle.loads
