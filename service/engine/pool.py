"""Worker pools: N model instances for one model, each taking one batch at a time.

`ProcessPool` starts supervised worker processes (production). `InlinePool` runs the same
Predictor + `run_batch` in threads of the front process (tests, in-process bench). Both report to
the engine through `PoolEvents` on the event loop thread, never from their own threads.

IPC: per worker, a socketpair carries pickled requests (messages.py) down and a one-way pipe
carries results up; the event loop writes and reads both without blocking (no helper threads, see
process.py). Image payloads of 16 KB and more do not go through the socketpair: the front writes
them once into that worker's shared-memory arena (arena.py) and the request carries a reference.
Before the arena, `os.write` of a 265 KB JPEG into the socketpair was 15% of the front process's
CPU with the null model at c16 (py-spy); the arena cut the front's share of that to a memcpy.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from .. import errors
from ..observability import metrics
from ..settings import ModelConfig, ServerSettings
from ..types import WorkerStatus
from .messages import (DEFAULT_PREDICTOR_FACTORY, BatchRequest, BatchResult, Heartbeat, LoadProgress, ModelFacts,
                       Shutdown, WorkerError, WorkerReady, WorkerSpec)
from .process import WorkerProcess, prepare_worker_context
from .scheduler import WorkerLoad
from .worker import describe, load_predictor, run_batch

log = logging.getLogger("detserve.engine")

MAX_BACKOFF_S = 30.0
# Heartbeats missed before a worker stops counting as live (readiness, dispatch); it is killed, and
# its batch retried elsewhere, only at heartbeat_timeout_s, in case it was merely starved.
HEARTBEAT_MISSES_UNTIL_SUSPECT = 2.5


class PoolEvents(Protocol):
    def batch_done(self, result: BatchResult) -> None: ...

    def batch_lost(self, worker_id: int, batch_id: int, reason: str) -> None: ...

    def workers_changed(self) -> None: ...


def threads_per_worker(cfg: ModelConfig, count: int) -> int:
    """The intra-op threads each of `count` workers gets (the rule and its measurement: WorkerConfig)."""
    return cfg.workers.threads_per_worker(count)


def device_for_slot(cfg: ModelConfig, slot: int) -> str:
    if cfg.workers.devices:
        return cfg.workers.devices[slot % len(cfg.workers.devices)]
    return cfg.device  # "auto" / "cuda": the worker resolves round-robin without torch in this process


@dataclass(eq=False)
class _Seat:
    """One worker position; survives restarts of the process (or thread) behind it."""

    worker_id: int
    slot: int
    device: str
    state: str = "starting"  # starting | ready | busy | restarting | stopped
    pid: int | None = None
    restarts: int = 0
    failures_in_a_row: int = 0
    batch: tuple[int, int, float] | None = None  # (batch_id, items, sent monotonic) while busy
    batch_deadline: float = float("inf")  # monotonic: past it (plus heartbeat_timeout_s) the batch is hung
    suspect: bool = False  # missed heartbeats: not live, gets no batch, until it beats again or is killed
    last_dispatch_at: float = float("-inf")
    retiring: bool = False
    handle: object | None = None  # WorkerProcess or _InlineHandle
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    load_error: str | None = None
    ever_ready: bool = False  # a worker that never came up is reported, not restarted forever
    progress_at: float = field(default_factory=time.monotonic)  # launch or last LoadProgress: the start clock
    wide_threads: int = 0  # elastic: threads for a batch that starts while no other seat is busy (0: fixed)

    def status(self) -> WorkerStatus:
        in_flight = self.batch[1] if self.batch else 0
        return WorkerStatus(self.worker_id, self.pid, self.device, self.state, self.restarts, in_flight,
                            not self.suspect)


class _PoolBase:
    def __init__(self, cfg: ModelConfig, settings: ServerSettings, events: PoolEvents, *,
                 predictor_factory: str | None = None, factory_kwargs: dict | None = None):
        self.cfg = cfg
        self.settings = settings
        self.events = events
        self.predictor_factory = predictor_factory or DEFAULT_PREDICTOR_FACTORY
        self.factory_kwargs = dict(factory_kwargs or {})
        self.facts: ModelFacts | None = None
        self._seats: list[_Seat] = []
        self._next_id = 0
        self._stopping = False
        # One scale at a time: a scale-down racing a scale-up used to retire the workers the other
        # was still waiting for, and the scale-up answered a false "not ready within 120 s".
        self._scaling = asyncio.Lock()

    # -- what the engine reads -------------------------------------------------------------
    def idle_workers(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(s.worker_id, 0, s.last_dispatch_at)
            for s in self._seats if s.state == "ready" and not s.retiring and s.batch is None and not s.suspect
        ]

    def live_count(self) -> int:
        return sum(1 for s in self._seats if s.state in ("ready", "busy") and not s.retiring and not s.suspect)

    def statuses(self) -> tuple[WorkerStatus, ...]:
        return tuple(s.status() for s in self._seats)

    @property
    def size(self) -> int:
        return sum(1 for s in self._seats if not s.retiring)

    def in_flight_items(self) -> int:
        return sum(s.batch[1] for s in self._seats if s.batch)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, count: int) -> None:
        await self.scale(count)

    async def scale(self, count: int) -> None:
        """Grow (waiting until the new workers are ready) or shrink (idle workers first; busy ones
        finish their batch first). Concurrent calls run one after the other, in order."""
        async with self._scaling:
            await self._scale(count)

    async def _prepare(self) -> None:
        """What launching needs first, made off the event loop (ProcessPool: the forkserver)."""

    async def _scale(self, count: int) -> None:
        active = [s for s in self._seats if not s.retiring]
        if count > len(active):
            await self._prepare()
        new = []
        for _ in range(count - len(active)):
            # The lowest free slot keeps GPU round-robin even after scaling down and up again.
            used = {s.slot for s in active + new}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            seat = _Seat(self._next_id, slot, device_for_slot(self.cfg, slot))
            self._next_id += 1
            self._seats.append(seat)
            new.append(seat)
            self._start(seat, threads_per_worker(self.cfg, count))
        if new:
            await self._await_ready(new)
        if count < len(active):
            # Cheapest first: a seat with no process, one still loading, an idle one, a busy one last.
            cost = {"restarting": 0, "stopped": 0, "starting": 1, "ready": 2, "busy": 3}
            victims = sorted(active, key=lambda s: (cost.get(s.state, 2), -s.slot))
            for seat in victims[: len(active) - count]:
                self._retire(seat)
        self._publish()

    async def _await_ready(self, seats: list[_Seat]) -> None:
        timeout = self.settings.worker_start_timeout_s
        while not all(s.ready_event.is_set() for s in seats):
            # Each load stage a worker reports (LoadProgress) restarts its clock; polled, since the
            # deadline moves (start-up only, so 50 ms of lag costs nothing).
            remaining = max(s.progress_at for s in seats) + timeout - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.05))
        failed = [s for s in seats if s.state != "ready" and s.state != "busy"]
        if failed:
            reason = next((s.load_error for s in failed if s.load_error), None) or (
                f"worker not ready within {timeout:.0f} s")
            for seat in seats:
                self._retire(seat)
                if seat in self._seats and seat.handle is None:
                    self._seats.remove(seat)
            self._publish()
            raise errors.ConfigError(f"model {self.cfg.name!r}: {reason}")

    def submit(self, worker_id: int, request: BatchRequest, deadline: float = float("inf")) -> None:
        """`deadline` (monotonic): how long the batch may run at all (the engine passes dispatch time +
        the model's request_timeout_ms); a batch still running well after it is treated as hung even
        while heartbeats arrive (a predictor stuck in native code). Not the clients' deadlines: a client
        asking for 200 ms gets its 504, and the worker finishing a long batch is not hung."""
        seat = self._seat(worker_id)
        if seat is None or seat.state != "ready" or seat.batch is not None:
            raise RuntimeError(f"worker {worker_id} cannot take a batch now")
        if seat.wide_threads and not any(s.batch for s in self._seats if s is not seat):
            request = replace(request, threads=seat.wide_threads)
        now = time.monotonic()
        seat.batch = (request.batch_id, len(request.items), now)
        seat.batch_deadline = deadline
        seat.last_dispatch_at = now
        seat.state = "busy"
        self._send(seat, request)

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        for seat in list(self._seats):
            self._retire(seat)
        await self._join_all(timeout_s)
        self._publish()

    # -- event handling on the loop thread ---------------------------------------------------
    def _on_ready(self, seat: _Seat, message: WorkerReady) -> None:
        seat.pid = message.pid
        seat.device = message.facts.device  # "auto" resolved by the worker
        if seat.device.startswith("cuda"):
            seat.wide_threads = 0  # the worker ignores widths on a GPU (worker_main); stop asking
        seat.state = "ready"
        seat.load_error = None
        seat.ever_ready = True
        self.facts = self.facts or message.facts
        seat.ready_event.set()
        self._publish()

    def _on_result(self, seat: _Seat, result: BatchResult) -> None:
        if seat.batch is None or seat.batch[0] != result.batch_id:
            return  # a late answer for a batch already declared lost
        seat.batch = None
        seat.failures_in_a_row = 0
        if seat.state == "busy":
            seat.state = "ready"
        self.events.batch_done(result)
        self._publish()

    def _on_gone(self, seat: _Seat, reason: str) -> None:
        """The worker behind `seat` is dead; answer its batch and restart it unless retiring."""
        lost = seat.batch
        seat.batch = None
        seat.handle = None
        seat.pid = None
        seat.suspect = False
        if lost is not None:
            self.events.batch_lost(seat.worker_id, lost[0], reason)
        if seat.retiring or self._stopping:
            seat.state = "stopped"
            if seat in self._seats:
                self._seats.remove(seat)
        elif not seat.ever_ready:
            seat.state = "stopped"  # never came up: _await_ready reports it
            seat.load_error = seat.load_error or f"worker exited before it was ready ({reason})"
            seat.ready_event.set()
        else:
            seat.state = "restarting"
            seat.restarts += 1
            seat.failures_in_a_row += 1
            metrics.WORKER_RESTARTS.labels(self.cfg.name).inc()
            delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (seat.failures_in_a_row - 1))
            log.warning("worker %d of %s gone (%s); restarting in %.1f s", seat.worker_id, self.cfg.name, reason, delay)
            loop = asyncio.get_running_loop()
            loop.call_later(delay, lambda: loop.create_task(self._restart(seat), name=f"restart-{self.cfg.name}"),
                            context=contextvars.Context())
        self._publish()

    async def _restart(self, seat: _Seat) -> None:
        if seat.retiring or self._stopping or seat not in self._seats:
            return
        await self._prepare()
        if seat.retiring or self._stopping or seat not in self._seats:
            return
        seat.state = "starting"
        seat.ready_event = asyncio.Event()
        self._start(seat, threads_per_worker(self.cfg, max(1, self.size)))

    def _start(self, seat: _Seat, threads: int) -> None:
        """Launch, and a launch that raises is a worker gone at once (a restart with backoff, or a
        failed start), never a seat left "starting" with no process behind it."""
        try:
            # In a fresh context: the callbacks a launch registers (the worker's pipe reader, the
            # supervisor) would otherwise log with the request id of the management call that scaled.
            contextvars.Context().run(self._launch, seat, threads)
        except Exception as exc:  # noqa: BLE001 - reported through the seat like any other failure
            log.exception("worker %d of %s could not be started", seat.worker_id, self.cfg.name)
            seat.load_error = seat.load_error or f"worker could not be started: {type(exc).__name__}: {exc}"
            self._on_gone(seat, seat.load_error)

    def _publish(self) -> None:
        metrics.LIVE_WORKERS.labels(self.cfg.name).set(self.live_count())
        self.events.workers_changed()

    def _seat(self, worker_id: int) -> _Seat | None:
        return next((s for s in self._seats if s.worker_id == worker_id), None)

    def _spec(self, seat: _Seat, threads: int) -> WorkerSpec:
        return WorkerSpec(seat.worker_id, self.cfg, seat.device, seat.slot, threads,
                          self.settings.heartbeat_interval_s, self.predictor_factory, self.factory_kwargs,
                          start_timeout_s=self.settings.worker_start_timeout_s, wide_threads=seat.wide_threads)

    # -- implemented per pool kind ---------------------------------------------------------
    def _launch(self, seat: _Seat, threads: int) -> None:
        raise NotImplementedError

    def _send(self, seat: _Seat, message) -> None:
        raise NotImplementedError

    def _retire(self, seat: _Seat) -> None:
        raise NotImplementedError

    async def _join_all(self, timeout_s: float) -> None:
        raise NotImplementedError


# A SIGKILLed worker still running after this is given up on (its batch answered, its seat
# restarted). A CUDA process can take many seconds to exit while the driver frees its memory; giving
# up sooner would load the replacement beside memory still held.
KILL_GRACE_S = 30.0


class ProcessPool(_PoolBase):
    """Supervised worker processes: a crash (EOF), a missed heartbeat, a batch stuck longer than the
    heartbeat timeout, or a start past `worker_start_timeout_s` kills and restarts with backoff."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._supervisor: asyncio.Task | None = None

    async def _prepare(self) -> None:
        # The forkserver's (re)start waits for it to import torch: in a thread, so the doors keep answering.
        await asyncio.get_running_loop().run_in_executor(None, prepare_worker_context, self.settings.worker_start_method)

    def _launch(self, seat: _Seat, threads: int) -> None:
        loop = asyncio.get_running_loop()
        # Only processes switch width (threads of the front would change its torch settings), and only on
        # CPU: a GPU batch's speed does not hang on intra-op threads.
        seat.wide_threads = 0 if seat.device.startswith("cuda") else self.cfg.workers.wide_threads(threads)
        seat.handle = handle = WorkerProcess(
            self._spec(seat, threads), loop, name=f"detserve-{self.cfg.name}-{seat.worker_id}",
            on_message=lambda h, m: self._on_message(seat, h, m), on_exit=lambda h, r: self._on_exit(seat, h, r),
            start_method=self.settings.worker_start_method)
        seat.pid = handle.process.pid
        if self._supervisor is None:
            self._supervisor = loop.create_task(self._supervise(), name=f"supervise-{self.cfg.name}")

    def _send(self, seat: _Seat, message) -> None:
        seat.handle.send(message)

    def _retire(self, seat: _Seat) -> None:
        seat.retiring = True
        if seat.handle is not None:
            seat.handle.send(Shutdown("scaled down" if not self._stopping else "stop"))  # after any batch
        else:
            seat.state = "stopped"
            if seat in self._seats:
                self._seats.remove(seat)

    def _on_message(self, seat: _Seat, handle: WorkerProcess, message) -> None:
        if seat.handle is not handle:
            return  # from a process already replaced
        handle.last_heartbeat = time.monotonic()
        if seat.suspect:
            seat.suspect = False
            log.warning("worker %d of %s answers again", seat.worker_id, self.cfg.name)
            self._publish()
        if isinstance(message, BatchResult):
            self._on_result(seat, message)
        elif isinstance(message, WorkerReady):
            self._on_ready(seat, message)
        elif isinstance(message, Heartbeat):
            if message.gpu_memory_allocated is not None:
                metrics.GPU_MEMORY_ALLOCATED.labels(self.cfg.name, seat.device).set(message.gpu_memory_allocated)
                metrics.GPU_MEMORY_RESERVED.labels(self.cfg.name, seat.device).set(message.gpu_memory_reserved or 0)
        elif isinstance(message, LoadProgress):
            seat.progress_at = time.monotonic()
            log.info("worker %d of %s: %s", seat.worker_id, self.cfg.name, message.stage)
        elif isinstance(message, WorkerError):
            seat.load_error = message.message
            log.error("worker %d of %s: %s", seat.worker_id, self.cfg.name, message.message)

    def _on_exit(self, seat: _Seat, handle: WorkerProcess, reason: str) -> None:
        if seat.handle is handle:
            self._on_gone(seat, seat.load_error or reason)

    async def _supervise(self) -> None:
        interval, timeout = self.settings.heartbeat_interval_s, self.settings.heartbeat_timeout_s
        suspect_after = min(interval * HEARTBEAT_MISSES_UNTIL_SUSPECT, timeout)
        tick = min(0.25, interval / 2)  # a missed beat is noticed within a quarter second
        last = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(tick)
            now = time.monotonic()
            stalled, last = now - last - tick, now
            if stalled > interval:
                # The event loop itself was blocked (a long request handler, a GC pause): the beats
                # sent meanwhile sit unread in the pipes, and this wake-up can run before the reader
                # does. The front's stall is not the workers' silence: forgive it, judge next tick.
                for seat in self._seats:
                    if seat.handle is not None:
                        seat.handle.last_heartbeat = max(seat.handle.last_heartbeat, now - interval)
                    seat.batch_deadline += stalled
                continue
            changed = False
            for seat in list(self._seats):
                handle = seat.handle
                if handle is None:
                    continue
                if handle.kill_reason is not None:
                    if now - handle.killed_at > max(timeout, KILL_GRACE_S):
                        # SIGKILL has not ended it (uninterruptible sleep in a driver): its batch is
                        # answered elsewhere and the seat restarts; a late exit of it is ignored.
                        log.error("worker pid %s of %s still runs %.1f s after SIGKILL; giving up on it",
                                  handle.process.pid, self.cfg.name, now - handle.killed_at)
                        self._on_gone(seat, f"{handle.kill_reason}; it did not exit after SIGKILL")
                    else:
                        handle.kill(handle.kill_reason)  # again: a no-op once its pipe has closed
                    continue
                if seat.state == "starting":
                    # Imports and weights loading may starve heartbeats on a busy box; only the start
                    # timeout applies until the worker says it is ready.
                    if now - max(handle.started_at, seat.progress_at) > self.settings.worker_start_timeout_s:
                        handle.kill("did not start in time")
                    continue
                silent = now - handle.last_heartbeat
                if silent > timeout:
                    handle.kill(f"missed heartbeats for {silent:.1f} s")
                elif seat.batch is not None and now > seat.batch_deadline + timeout:
                    handle.kill("batch still running past the model's request_timeout_ms")
                elif silent > suspect_after and not seat.suspect:
                    seat.suspect = changed = True
                    log.warning("worker %d of %s missed heartbeats for %.1f s: not live until it answers",
                                seat.worker_id, self.cfg.name, silent)
            if changed:
                self._publish()

    async def _join_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(s.handle is not None for s in self._seats) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for seat in self._seats:
            if seat.handle is not None:
                seat.handle.kill("did not stop in time")
        # SIGKILL by pid ends them in milliseconds; what is left is their exit status.
        while any(s.handle is not None for s in self._seats) and time.monotonic() < deadline + 2.0:
            await asyncio.sleep(0.02)
        if self._supervisor is not None:
            self._supervisor.cancel()


class _InlineHandle:
    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detserve-inline")
        self.predictor = None


class InlinePool(_PoolBase):
    """The same predictor and batch code in one thread per worker, no processes (style habit 5)."""

    def _launch(self, seat: _Seat, threads: int) -> None:
        loop = asyncio.get_running_loop()
        seat.handle = handle = _InlineHandle()
        seat.pid = os.getpid()
        spec = self._spec(seat, threads)
        future = loop.run_in_executor(handle.executor, load_predictor, spec)
        future.add_done_callback(lambda f: self._loaded(seat, handle, threads, f))

    def _loaded(self, seat: _Seat, handle: _InlineHandle, threads: int, future: asyncio.Future) -> None:
        if seat.handle is not handle:
            return
        try:
            handle.predictor = future.result()
            facts = describe(handle.predictor)
        except Exception as exc:  # noqa: BLE001 - reported by _await_ready
            seat.load_error = f"model {self.cfg.name!r} failed to load: {type(exc).__name__}: {exc}"
            self._finish(seat, handle, seat.load_error)
            return
        self._on_ready(seat, WorkerReady(seat.worker_id, os.getpid(), threads, facts))

    def _send(self, seat: _Seat, message) -> None:
        handle: _InlineHandle = seat.handle
        loop = asyncio.get_running_loop()
        if isinstance(message, BatchRequest):
            future = loop.run_in_executor(handle.executor, run_batch, handle.predictor, message, seat.worker_id)
            future.add_done_callback(lambda f: self._ran(seat, handle, f))
        elif isinstance(message, Shutdown):
            future = loop.run_in_executor(handle.executor, _close_quietly, handle)
            future.add_done_callback(lambda f: self._finish(seat, handle, message.reason))

    def _ran(self, seat: _Seat, handle: _InlineHandle, future: asyncio.Future) -> None:
        if seat.handle is not handle:
            return
        if future.exception() is not None:
            self._finish(seat, handle, f"batch crashed: {future.exception()!r}")
        else:
            self._on_result(seat, future.result())

    def _finish(self, seat: _Seat, handle: _InlineHandle, reason: str) -> None:
        if seat.handle is handle:
            # A crashed batch leaves the predictor loaded; a process worker's exit frees it, a thread's does not.
            handle.executor.submit(_close_quietly, handle)
            handle.executor.shutdown(wait=False)
            self._on_gone(seat, reason)

    def _retire(self, seat: _Seat) -> None:
        seat.retiring = True
        if seat.handle is not None:
            self._send(seat, Shutdown("stop"))
        else:
            seat.state = "stopped"
            if seat in self._seats:
                self._seats.remove(seat)

    async def _join_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(s.handle is not None for s in self._seats) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def _close_quietly(handle: _InlineHandle) -> None:
    predictor, handle.predictor = handle.predictor, None  # once: a Shutdown closes, then _finish runs
    if predictor is None:
        return
    try:
        predictor.close()
    except Exception:  # noqa: BLE001 - shutting down anyway
        log.exception("predictor.close() failed")
