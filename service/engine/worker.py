"""The worker process: one Predictor on one device, fed batches over a Pipe.

`worker_main` runs in a child forked from the forkserver (process.py `worker_context`), or spawned.
`run_batch` is the part shared with the inline (in-process) pool: predictor call, CUDA out-of-memory
splitting, and the rule that any exception becomes a typed per-item error instead of a dead worker.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .. import errors
from ..types import DetectOptions, DetectResult, RawImage
from .arena import WorkerArena
from .messages import (
    LoadProgress,
    BatchRequest,
    BatchResult,
    Heartbeat,
    ModelFacts,
    Shutdown,
    WorkerError,
    WorkerReady,
    WorkerSpec,
    WorkItem,
    dumps,
)

Outcome = DetectResult | errors.DetserveError


def resolve_factory(path: str) -> Callable:
    """"pkg.module:Class.method" -> the callable (so tests can hand workers a fake predictor)."""
    module_name, _, attr_path = path.partition(":")
    target = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    return target


def pick_device(device: str, slot: int) -> str:
    """"auto" or bare "cuda": round-robin over visible GPUs by worker slot; "auto" falls back to CPU."""
    if device not in ("auto", "cuda"):
        return device
    if device == "auto" and not _may_have_gpu():
        return "cpu"  # skip importing torch just to learn there is no GPU (weightless archs never need it)
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return f"cuda:{slot % torch.cuda.device_count()}"
    return "cpu" if device == "auto" else "cuda:0"  # explicit cuda without a GPU fails loudly at load


def _may_have_gpu() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"))


def load_predictor(spec: WorkerSpec):
    factory = resolve_factory(spec.predictor_factory)
    device = pick_device(spec.device, spec.slot)
    return factory(spec.model_config, device=device, threads=spec.threads, **spec.extra)


def warm_up(predictor, config, progress: Callable[[str], None] | None = None, budget_s: float = 60.0) -> None:
    """Blank images through the model before the worker says ready (workers.warmup): one twice, then
    a batch of max_batch_size, each announced as load progress (which restarts the pool's start-up
    clock). The batch is skipped when a warm image says it would take over `budget_s`, so a slow
    model still starts (as long as one image fits in the start-up timeout). Nothing here is fatal:
    the model loaded, and a real batch that fails the same way gets its own typed error."""
    workers, batch = getattr(config, "workers", None), getattr(config, "batch", None)
    if not getattr(workers, "warmup", False) or batch is None:
        return
    report = progress or (lambda stage: None)
    try:
        # The working shape, which the family knows: keep-ratio ones (two-stage) are not square.
        sized = getattr(predictor, "working_size", None)
        width, height = sized() if sized else (int(predictor.input_size),) * 2
        image = RawImage(bytes(width * height * 3), height, width)
        size = batch.max_batch_size
        started = time.perf_counter()
        # One image twice (the first pays the one-time costs: compilation, autotuning, lazy
        # loading), then the batch if the second image's time says it fits.
        for n in (1, 1, size) if size > 1 else (1, 1):
            if n > 1 and one_s * n > budget_s:
                report(f"warm-up: one image takes {one_s:.2f} s, so no batch of {n}")
                return
            report(f"warming up: {n} blank {width}x{height} image(s)")
            step = time.perf_counter()
            outcomes = _BatchRunner(predictor).run([WorkItem(i, image, DetectOptions()) for i in range(n)])
            one_s = time.perf_counter() - step
            failed = [o for o in outcomes if isinstance(o, errors.DetserveError)]
            if failed:
                report(f"warm-up failed, serving anyway: {failed[0].message}")
                return
        report(f"warmed up in {time.perf_counter() - started:.2f} s")
    except Exception as exc:  # noqa: BLE001 - a warm-up never stops a model that loaded
        report(f"warm-up failed, serving anyway: {type(exc).__name__}: {exc}")


def describe(predictor) -> ModelFacts:
    return ModelFacts(
        name=predictor.name,
        version=predictor.version,
        arch=getattr(predictor, "arch", ""),
        classes=tuple(predictor.classes),
        has_masks=bool(predictor.has_masks),
        input_size=int(predictor.input_size),
        device=str(predictor.device),
        backend=predictor.backend_name,
        backend_reason=str(getattr(predictor, "backend_reason", "")),
        resize_scale=getattr(getattr(predictor, "cfg", None), "resize_scale", None),  # pydantic-typed already
    )


def _free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _internal(exc: BaseException) -> errors.DetserveError:
    if isinstance(exc, errors.DetserveError):
        return exc
    return errors.InternalError(f"{type(exc).__name__}: {exc}")


class _BatchRunner:
    def __init__(self, predictor):
        self.predictor = predictor
        self.oom_splits = 0

    def run(self, items: Sequence[WorkItem]) -> list[Outcome]:
        try:
            outcomes = self.predictor.predict([i.image for i in items], [i.options for i in items])
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed per-item error
            return self._recover(items, exc)
        if len(outcomes) != len(items):
            # A predictor that loses or invents results is a bug; fail the batch loudly, not silently.
            message = f"predictor returned {len(outcomes)} results for a batch of {len(items)}"
            return [errors.InternalError(message) for _ in items]
        return list(outcomes)

    def _recover(self, items: Sequence[WorkItem], exc: Exception) -> list[Outcome]:
        if errors.is_cuda_out_of_memory(exc):
            if len(items) == 1:
                _free_cuda_cache()
                return [errors.InternalError("CUDA out of memory on a single image")]
            self.oom_splits += 1
            _free_cuda_cache()
            half = len(items) // 2
            return self.run(items[:half]) + self.run(items[half:])
        if len(items) > 1:
            # One poisoned image must not fail its batch-mates: retry them one by one.
            return [outcome for item in items for outcome in self.run([item])]
        return [_internal(exc)]


def run_batch(predictor, request: BatchRequest, worker_id: int) -> BatchResult:
    started = time.perf_counter()
    runner = _BatchRunner(predictor)
    outcomes = runner.run(request.items)
    return BatchResult(
        batch_id=request.batch_id,
        worker_id=worker_id,
        outcomes=tuple(outcomes),
        batch_size=len(request.items),
        worker_seconds=time.perf_counter() - started,
        oom_splits=runner.oom_splits,
    )


class _Sender:
    """The main loop and the heartbeat thread share one connection; sends must not interleave."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message) -> bool:
        payload = dumps(message)  # before the lock; a message that cannot be pickled sends nothing
        try:
            with self.lock:
                self.conn.send_bytes(payload)
            return True
        except (OSError, EOFError, BrokenPipeError):
            return False  # the front process is gone; the main loop will see EOF and exit


def _gpu_memory(device: str) -> tuple[int | None, int | None]:
    if not device.startswith("cuda"):
        return None, None
    torch = sys.modules.get("torch")
    try:
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    except Exception:  # noqa: BLE001 - a heartbeat must never kill the worker
        return None, None


def _heartbeat_loop(sender: _Sender, spec: WorkerSpec, device_box: list[str], stop: threading.Event) -> None:
    while not stop.wait(spec.heartbeat_interval_s):
        allocated, reserved = _gpu_memory(device_box[0])
        beat = Heartbeat(spec.worker_id, time.time(), allocated, reserved)
        if not sender.send(beat):
            return


def _send_result(sender: _Sender, result: BatchResult) -> None:
    try:
        sender.send(result)  # pickled whole before anything is written: a failure leaves no partial frame
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result: fail the items, keep the worker
        failed = tuple(errors.InternalError(f"result not transferable: {exc}") for _ in result.outcomes)
        sender.send(BatchResult(result.batch_id, result.worker_id, failed, result.batch_size, result.worker_seconds))


class _Width:
    """The intra-op threads the worker runs its next batch on: torch's pool, and the backend's own
    where it has one (ONNX Runtime keeps a session per width). Elastic workers switch per batch."""

    def __init__(self, predictor, threads: int):
        self.predictor = predictor
        self.threads = 0
        self.use(threads)

    def use(self, threads: int) -> None:
        if threads == self.threads:
            return
        torch = sys.modules.get("torch")  # only when the predictor needed it
        if torch is not None:
            torch.set_num_threads(threads)
        set_threads = getattr(self.predictor, "set_threads", None)
        if set_threads is not None:
            set_threads(threads)
        self.threads = threads


def set_thread_env(threads: int) -> None:
    """The OpenMP environment of a worker process, before torch is imported (the in-process bench sets
    the same, so its baseline runs under the worker's conditions). A worker forked from the forkserver
    has torch imported already, under forkserver_preload's settings; torch.set_num_threads sizes it."""
    # Before torch is imported, so OpenMP pools are sized for our share of the cores.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    # Idle OpenMP threads sleep instead of spinning. Measured on the shared 2-core box: rtmdet-tiny
    # at 320 took 19 s per image with spinning 2-thread pools and 1.2 s with PASSIVE.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def worker_main(requests, results, spec: WorkerSpec) -> None:
    """Entry point of a worker process (forked from the forkserver, or spawned): `requests` carries
    BatchRequest/Shutdown in, `results` (one-way) carries everything out."""
    if spec.environ is not None:
        os.environ.clear()
        os.environ.update(spec.environ)
    set_thread_env(spec.threads)
    # A terminal Ctrl+C reaches the whole process group; the front process drains and then stops
    # us with a Shutdown message, so the worker must not die mid-batch on its own.
    # The same for SIGTERM: systemd (KillMode=control-group) and `kill -- -PGID` signal every process;
    # a worker dying then would fail its batch and make the pool restart it mid-shutdown. SIGKILL
    # (the pool's own kill) and EOF on the request pipe (the front process gone) still end us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sender = _Sender(results)
    stop = threading.Event()
    device_box = ["cpu"]
    # Heartbeats start before the model loads so a slow load is not mistaken for a hang.
    beat = threading.Thread(target=_heartbeat_loop, args=(sender, spec, device_box, stop), daemon=True)
    beat.start()
    from ..backends import auto

    auto.progress_hook = lambda stage: sender.send(LoadProgress(spec.worker_id, stage))
    try:
        predictor = load_predictor(spec)
        facts = describe(predictor)
        width = _Width(predictor, spec.threads)
        # A GPU batch does not hang on intra-op threads (and "auto" may have resolved to one).
        wide = spec.wide_threads if not str(facts.device).startswith("cuda") else 0
        for threads in (spec.threads, wide) if wide else (spec.threads,):
            if threads != spec.threads:  # an elastic worker warms both widths: either may take the first batch
                auto.progress_hook(f"elastic: the {threads}-thread width")
            width.use(threads)
            warm_up(predictor, spec.model_config, progress=auto.progress_hook, budget_s=spec.start_timeout_s / 2)
    except Exception as exc:  # noqa: BLE001 - report why, then exit; the pool decides what to do
        sender.send(WorkerError(spec.worker_id, f"model {getattr(spec.model_config, 'name', '?')!r} failed to load: {type(exc).__name__}: {exc}"))
        stop.set()
        _exit_now(1)
    device_box[0] = facts.device
    arena = WorkerArena.open(spec.arena)
    sender.send(WorkerReady(spec.worker_id, os.getpid(), spec.threads, facts, arena_mapped=arena is not None))
    try:
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):
                break  # the front process went away
            if isinstance(message, Shutdown):
                break
            if isinstance(message, BatchRequest):
                if arena is not None:
                    message = arena.resolve(message)
                width.use(message.threads if wide and message.threads else spec.threads)
                _send_result(sender, run_batch(predictor, message, spec.worker_id))
    finally:
        stop.set()
        try:
            predictor.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Skip interpreter teardown: with torch loaded it took 10+ s on a busy box, for nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
