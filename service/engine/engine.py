"""The engine every door calls: per model, one Scheduler queue, one worker pool, one dispatcher task.

`Engine(settings)` runs worker processes; `Engine(settings, inline=True)` runs the same
scheduler and batch code with predictors in threads of this process (tests, in-process bench).
The front process never imports torch: workers report the model facts when they are ready.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from .. import errors
from ..observability import metrics
from ..settings import BatchConfig, ModelConfig, ServerSettings, discover_models, load_model_config
from ..types import BatchSettings, DetectOptions, DetectResult, ImageInput, ModelInfo, Priority
from ..types import Protocol as Door
from .messages import BatchRequest, BatchResult, WorkItem
from .pool import InlinePool, ProcessPool
from .scheduler import Dispatch, QueueItem, Scheduler
from ..pipeline.shape_key import shape_key
from .tiling import assemble, expand, item_count

log = logging.getLogger("detserve.engine")

_STAGES = ("decode", "preprocess", "inference", "postprocess")


@dataclass(slots=True)
class _Work:
    """The scheduler payload: what goes to the worker and where its answer lands."""

    item: WorkItem
    future: asyncio.Future  # result: DetectResult | DetserveError (never set_exception: no orphan warnings)


_TIMED_OUT = object()  # what a request's future holds when its deadline passed first


async def _within(loop: asyncio.AbstractEventLoop, future: asyncio.Future, timeout: float):
    """`await future`, or _TIMED_OUT after `timeout` s. For the common one-image request this is one
    timer instead of asyncio.wait's waiter future, done-callbacks and sets (a few % of the front's
    CPU with the null model); a future answered by the timer is one the dispatcher then skips."""
    timer = loop.call_later(timeout, _time_out, future)
    try:
        return await future
    finally:
        timer.cancel()


def _time_out(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)


def _answer(item: QueueItem, outcome) -> None:
    future = item.payload.future
    if not future.done():
        future.set_result(outcome)


class _ModelRuntime:
    """One model: queue, pool and dispatcher. Implements the pool's PoolEvents."""

    def __init__(self, cfg: ModelConfig, settings: ServerSettings, *, inline: bool,
                 predictor_factory: str | None, factory_kwargs: dict | None):
        self.cfg = cfg
        self.batch = BatchSettings(**cfg.batch.model_dump())
        self.scheduler = Scheduler(self.batch, time.monotonic)
        self.metrics = metrics.ModelMetrics(cfg.name)
        pool_cls = InlinePool if inline else ProcessPool
        self.pool = pool_cls(cfg, settings, self, predictor_factory=predictor_factory, factory_kwargs=factory_kwargs)
        self.accepting = False
        self.unloading = False  # set by Engine.unload_model, which may run while start() is loading
        self.in_flight: dict[int, tuple[Dispatch, list[QueueItem]]] = {}
        self._wake = asyncio.Event()
        self._batch_ids = itertools.count(1)
        self._task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def input_size(self) -> int:
        facts = self.pool.facts
        return facts.input_size if facts else self.cfg.input_size

    @property
    def resize_scale(self) -> tuple[int, int] | None:
        """The keep-ratio bound the workers' transform uses; the file's value until a worker reports the
        family's default (a two-stage model without resize_scale resizes to 1333x800 all the same)."""
        facts = self.pool.facts
        return facts.resize_scale if facts else self.cfg.resize_scale

    async def start(self, workers: int) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=f"dispatch-{self.name}")
        try:
            await self.pool.start(workers)
        except BaseException:
            self._task.cancel()
            raise
        self.accepting = True

    def wake(self) -> None:
        self._wake.set()

    # -- PoolEvents (loop thread) -------------------------------------------------------------
    def workers_changed(self) -> None:
        if self.accepting and self.pool.size == 0 and self.scheduler.depth:
            # Scaled to 0 (Engine.detect refuses new requests the same way): what is queued would
            # otherwise wait for its deadline, since no seat will ever take it.
            for item in self.scheduler.take_all():
                metrics.REJECTED.labels(self.name, "not_ready").inc()
                _answer(item, errors.ModelNotReady(f"model {self.name!r} was scaled to 0 workers before this "
                                                   "request ran"))
            self._publish()
        self._wake.set()

    def batch_done(self, result: BatchResult) -> None:
        entry = self.in_flight.pop(result.batch_id, None)
        if entry is None:
            return
        dispatch, items = entry
        self.scheduler.complete(dispatch, time.monotonic())
        if result.oom_splits:
            metrics.OOM_SPLITS.labels(self.name).inc(result.oom_splits)
        stages = self.metrics.stages
        for item, outcome in zip(items, result.outcomes):
            if isinstance(outcome, DetectResult):
                times = outcome.times
                for stage in _STAGES:
                    stages[stage].observe(getattr(times, stage))
            _answer(item, outcome)
        self._publish()
        self._wake.set()

    def batch_lost(self, worker_id: int, batch_id: int, reason: str) -> None:
        """Detection is idempotent: retry each item once on another worker, else fail it fast."""
        entry = self.in_flight.pop(batch_id, None)
        if entry is None:
            return
        _, items = entry
        pending = [i for i in items if not i.payload.future.done()]
        can_retry = self.pool.size > 0  # a seat that will come back (restarting counts)
        retry = [i for i in pending if i.attempts < 2 and can_retry]
        for item in pending:
            if item not in retry:
                _answer(item, errors.WorkerDied(f"worker {worker_id} of {self.name!r} died ({reason}) running this request"))
        self.scheduler.requeue(retry)
        self._publish()
        self._wake.set()

    # -- the dispatcher -------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = time.monotonic()
            for item in self.scheduler.expire(now):
                metrics.REJECTED.labels(self.name, "deadline").inc()
                _answer(item, errors.DeadlineExceeded(f"request {item.request_id} expired in the queue of {self.name!r}"))
            while (dispatch := self.scheduler.next_batch(now, self.pool.idle_workers())) is not None:
                self._send(dispatch, now)
            self._publish()
            wake_at = self.scheduler.wake_at(now)
            # A timer that sets the event, not asyncio.wait_for: that wraps the wait in a new Task on
            # every pass of this loop, which runs once or more per batch.
            timer = None if wake_at is None else loop.call_later(max(0.0, wake_at - time.monotonic()), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _send(self, dispatch: Dispatch, now: float) -> None:
        items = [i for i in dispatch.batch.items if not i.payload.future.done()]  # caller gave up
        if not items:
            return
        batch_id = next(self._batch_ids)
        mix = dispatch.batch.protocol_mix
        model_metrics = self.metrics
        model_metrics.batch_size.observe(len(items))
        for item in items:
            item.attempts += 1
            model_metrics.queue_wait.observe(now - item.enqueued_at)
            model_metrics.batch_item(item.protocol.value, mix).inc()
        self.in_flight[batch_id] = (dispatch, items)
        request = BatchRequest(batch_id, tuple(i.payload.item for i in items))
        # The hang bound runs from dispatch: no batch needs longer than a request may ever take.
        self.pool.submit(dispatch.worker_id, request, now + self.batch.request_timeout_ms / 1000.0)

    def _publish(self) -> None:
        self.metrics.queue_depth.set(self.scheduler.depth)
        self.metrics.in_flight.set(sum(len(items) for _, items in self.in_flight.values()))

    # -- shutdown -------------------------------------------------------------------------
    async def drain_and_stop(self, timeout_s: float) -> None:
        """Stop accepting, let queued and in-flight work finish (up to `timeout_s`), stop workers."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while (self.scheduler.depth or self.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for item in self.scheduler.take_all():
            _answer(item, errors.ModelNotReady(f"model {self.name!r} stopped before this request ran"))
        for _, items in self.in_flight.values():
            for item in items:
                _answer(item, errors.WorkerDied(f"model {self.name!r} stopped while this request ran"))
        self.in_flight.clear()
        if self._task is not None:
            self._task.cancel()
        # Workers get their own grace period: the drain may have used the whole budget.
        await self.pool.stop(timeout_s=max(5.0, deadline - time.monotonic()))
        self._publish()

    def info(self) -> ModelInfo:
        facts = self.pool.facts
        return ModelInfo(
            name=self.name,
            version=facts.version if facts else self.name,
            arch=facts.arch if facts and facts.arch else self.cfg.arch,
            backend=facts.backend if facts else self.cfg.backend.value,
            classes=facts.classes if facts else tuple(self.cfg.classes or ()),
            input_size=facts.input_size if facts else self.cfg.input_size,
            has_masks=facts.has_masks if facts else False,
            ready=self.accepting and self.pool.live_count() > 0,
            batch=self.batch,
            workers=self.pool.statuses(),
            queue_depth=self.scheduler.depth,
            default_score_thr=self.cfg.default_score_thr,
            max_per_img=self.cfg.test_cfg.max_per_img,
            backend_reason=facts.backend_reason if facts else "",
        )


class Engine:
    """Implements service.engine.api.EngineAPI."""

    def __init__(self, settings: ServerSettings, *, inline: bool = False,
                 predictor_factory: str | None = None, factory_kwargs: dict | None = None):
        self.settings = settings
        self.inline = inline
        # Tests hand workers a fake predictor ("module:Class.factory"); production uses the Predictor.
        self._factory = predictor_factory
        self._factory_kwargs = factory_kwargs
        self._models: dict[str, _ModelRuntime] = {}
        self._configured: set[str] = set()
        self._item_ids = itertools.count(1)
        self._started = False
        self._stopping = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        store = discover_models(self.settings.model_store)
        names = list(self.settings.models) if self.settings.models is not None else list(store)
        missing = [n for n in names if n not in store]
        if missing:
            raise errors.ConfigError(f"model(s) {missing} not found in model store {str(self.settings.model_store)!r}")
        results = await asyncio.gather(*(self.load_model(n) for n in names), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop(0)
            raise failures[0]
        self._configured = set(names)
        self._started = True

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """SIGTERM path: refuse new work (503), finish queued and in-flight work, stop workers."""
        timeout = self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stopping = True
        for runtime in self._models.values():
            runtime.accepting = False
        await asyncio.gather(*(r.drain_and_stop(timeout) for r in self._models.values()))
        self._models.clear()
        self._stopped = True

    # -- health ---------------------------------------------------------------------------
    def live(self) -> bool:
        return not self._stopped

    def ready(self) -> bool:
        if not self._started or self._stopping:
            return False
        return all(self.model_ready(n) for n in self._configured if n in self._models)

    def has_model(self, model: str) -> bool:
        return model in self._models

    def model_ready(self, model: str) -> bool:
        runtime = self._models.get(model)
        return runtime is not None and runtime.accepting and runtime.pool.live_count() > 0

    # -- inference ------------------------------------------------------------------------
    async def detect(self, model: str, images: Sequence[ImageInput], options: DetectOptions = DetectOptions(), *,
                     protocol: Door = Door.REST, request_id: str | None = None,
                     timeout_s: float | None = None, priority: Priority = Priority.NORMAL) -> list[DetectResult]:
        if self._stopping:
            raise errors.ModelNotReady("the server is shutting down")
        runtime = self._runtime(model)
        if not runtime.accepting or runtime.pool.size == 0:
            metrics.REJECTED.labels(model, "not_ready").inc()
            reason = "it has no workers" if runtime.accepting else "it is loading, unloading or stopping"
            raise errors.ModelNotReady(f"model {model!r} is not accepting requests: {reason}")
        if not images:
            raise errors.InvalidRequest("no images in the request")
        if len(images) > runtime.batch.max_queue_size:
            # Not 429: retrying can never succeed, the request does not fit even an empty queue.
            raise errors.PayloadTooLarge(f"{len(images)} images in one request exceed the whole queue of {model!r} "
                                         f"(max_queue_size {runtime.batch.max_queue_size})")
        work = expand(images, options, runtime.cfg, runtime.input_size)  # tiled images: one item per tile
        count = item_count(work)
        if count > runtime.batch.max_queue_size:
            raise errors.PayloadTooLarge(f"{len(images)} image(s) cut into {count} tiles exceed the whole queue of "
                                         f"{model!r} (max_queue_size {runtime.batch.max_queue_size}); use a larger "
                                         f"tile side or fewer images per request")
        longest = runtime.batch.request_timeout_ms / 1000.0
        if timeout_s is not None and not timeout_s > 0:
            raise errors.InvalidRequest(f"request timeout must be positive, got {timeout_s} s")
        # A client may ask for less than the model's request_timeout_ms, never more: the deadline also
        # bounds how long a stuck batch may hold a worker before the pool kills it.
        timeout = longest if timeout_s is None else min(timeout_s, longest)
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = []
        resize_scale = runtime.resize_scale
        for image_work in work:
            # A whole image of a keep-ratio model batches with others of its padded shape (scheduler
            # "Shape groups"); the tiles of one image are consecutive and equal-sized already.
            key = shape_key(image_work.inputs[0], resize_scale) if image_work.plan is None else None
            for image in image_work.inputs:
                item_id = next(self._item_ids)
                payload = _Work(WorkItem(item_id, image, image_work.options), loop.create_future())
                items.append(QueueItem(item_id, request_id, protocol, now, now + timeout, payload, priority=priority,
                                       shape_key=key))
        try:
            runtime.scheduler.add_all(items)
        except errors.Overloaded:
            metrics.REJECTED.labels(model, "queue_full").inc()
            raise
        runtime.wake()
        futures = [item.payload.future for item in items]
        try:
            if len(futures) == 1:
                outcomes = [await _within(loop, futures[0], timeout)]
            else:
                _, pending = await asyncio.wait(futures, timeout=timeout)
                outcomes = [_TIMED_OUT if pending else f.result() for f in futures]
        finally:
            for future in futures:  # the caller went away or timed out: never run what is still queued
                future.cancel()
        if _TIMED_OUT in outcomes:
            raise errors.DeadlineExceeded(f"request {request_id} exceeded its {timeout * 1000:.0f} ms deadline")
        for outcome in outcomes:
            if isinstance(outcome, errors.DetserveError):
                raise outcome
        return await assemble(work, outcomes, options, runtime.cfg.tiling.max_dets)

    # -- management -----------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [r.info() for r in self._models.values()]

    def model_info(self, model: str) -> ModelInfo:
        return self._runtime(model).info()

    async def load_model(self, name: str, *, workers: int | None = None) -> ModelInfo:
        if name in self._models:
            raise errors.Conflict(f"model {name!r} is already loaded")
        folder = discover_models(self.settings.model_store).get(name)
        if folder is None:
            raise errors.ModelNotFound(f"no model {name!r} in model store {str(self.settings.model_store)!r}")
        cfg = load_model_config(folder)
        count = cfg.workers.count if workers is None else self._check_count(workers)
        runtime = _ModelRuntime(cfg, self.settings, inline=self.inline,
                                predictor_factory=self._factory, factory_kwargs=self._factory_kwargs)
        self._models[name] = runtime
        try:
            await runtime.start(count)
        except BaseException as exc:
            # The unload may still be draining (it pops the model last): its flag tells, not the dict.
            if self._models.get(name) is runtime and not runtime.unloading:
                self._models.pop(name, None)
            await runtime.drain_and_stop(0)
            if not (runtime.unloading and isinstance(exc, Exception)):  # else its workers were stopped under it
                raise
        if runtime.unloading:
            raise errors.Conflict(f"model {name!r} was unregistered while it was being loaded")
        log.info("model %s loaded with %d worker(s)", name, count)
        return runtime.info()

    async def unload_model(self, name: str) -> None:
        runtime = self._runtime(name)
        runtime.unloading = True
        await runtime.drain_and_stop(self.settings.drain_timeout_s)
        self._models.pop(name, None)
        self._configured.discard(name)
        metrics.forget_model(name)
        log.info("model %s unloaded", name)

    async def scale_workers(self, name: str, count: int) -> ModelInfo:
        runtime = self._runtime(name)
        await runtime.pool.scale(self._check_count(count))
        return runtime.info()

    async def set_batch_settings(self, name: str, *, max_batch_size: int | None = None,
                                 max_batch_delay_ms: float | None = None, max_queue_size: int | None = None,
                                 request_timeout_ms: float | None = None) -> ModelInfo:
        runtime = self._runtime(name)
        changes = {k: v for k, v in dict(max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms,
                                          max_queue_size=max_queue_size, request_timeout_ms=request_timeout_ms).items()
                   if v is not None}
        try:
            checked = BatchConfig(**{**dataclasses.asdict(runtime.batch), **changes})  # same bounds as model.toml
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise errors.InvalidRequest(f"invalid batch settings: {details}") from None
        runtime.batch = BatchSettings(**checked.model_dump())
        runtime.scheduler.settings = runtime.batch
        runtime.wake()
        return runtime.info()

    def _runtime(self, model: str) -> _ModelRuntime:
        runtime = self._models.get(model)
        if runtime is None:
            raise errors.ModelNotFound(f"model {model!r} is not loaded")
        return runtime

    @staticmethod
    def _check_count(count: int) -> int:
        if not 0 <= count <= 64:
            raise errors.InvalidRequest(f"worker count must be between 0 and 64, got {count}")
        return count
