"""The dynamic batcher: one bounded FIFO queue per model, stepped by the caller with an injected clock.

Pure on purpose: no asyncio, no processes, no sleeps. The engine's dispatcher calls `expire(now)`,
then `next_batch(now, idle_workers)` until it returns None, then sleeps until `wake_at(now)` or the
next add / worker-idle event. Tests drive it the same way with a fake clock.

Policy (Triton's dynamic batcher, not TorchServe's fixed wait):
- `max_batch_delay_ms == 0`: whatever is queued goes out at once to an idle worker, up to
  `max_batch_size`; a lone request never waits while a worker is idle.
- `max_batch_delay_ms > 0`: hold for a fuller batch, but dispatch as soon as the batch is full or
  the oldest item has waited the delay; no item waits longer than the delay for company.
- A full queue refuses at `add` (Overloaded, with a Retry-After estimate), never later.
- Items past their deadline are handed back by `expire` and are never in a batch.
- Two priorities: NORMAL (requests from the inference doors) and LOW (background jobs such as
  Label Studio pre-annotation). A batch takes every NORMAL item it can before any LOW one, so a
  job fills idle capacity. LOW items share the queue's size cap; the job bounds how many it keeps
  queued. A running batch is never interrupted, so while NORMAL items came in within
  `busy_window_s`, LOW items go at most `low_batch_when_busy` to a batch and never ride along in a
  batch with NORMAL ones: on a CPU a batch takes time in proportion to its images, and a request
  that arrives while a job batch runs waits for all of it. Also while busy, job batches take at
  most `low_share_when_busy` of the time: after one completes, the next waits (1/share - 1) times
  its run time. A request then finds a job image in the worker about that often, so at the
  median it finds none: with one image per batch and no rest, a job kept the worker busy and the
  requests' p50 rose to 1.65-3.3x idle. Without NORMAL traffic, LOW items are batched like any other.
- Shape groups: items may carry a `shape_key` (the padded network input shape of a keep-ratio model,
  read from the image header by the front). Within the first SHAPE_LOOKAHEAD batches' worth of each
  lane, a batch takes items in groups of equal key, groups ordered by their oldest item, so that images
  that can share one padded network batch travel together (a worker runs a batch as one network call
  per distinct shape: spec pitfall 19). The oldest item always goes in the next batch, so grouping
  reorders only within the look-ahead window and never starves anyone; keys of None never group, and
  with no keys at all the order is plain FIFO.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import errors
from ..types import Priority
from ..types import Protocol as Door

SHAPE_LOOKAHEAD = 4  # batches' worth of queued items a batch may pick shape-mates from


class BatchPolicy(Protocol):
    """What the scheduler reads from its settings (service.types.BatchSettings fits)."""

    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_size: int


@dataclass(slots=True)
class QueueItem:
    """One image of one request. `payload` is opaque to the scheduler (the engine's work + future)."""

    item_id: int
    request_id: str
    protocol: Door
    enqueued_at: float  # clock seconds
    deadline: float  # clock seconds; past it the item is answered 504 and never run
    payload: Any = None
    attempts: int = 0  # dispatches so far; a worker crash requeues once
    priority: Priority = Priority.NORMAL
    shape_key: Hashable | None = None  # equal keys can share one network batch; None: never grouped


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """An idle worker as the pool sees it. Lower `in_flight`, then older `last_dispatch_at`, wins."""

    worker_id: int
    in_flight: int = 0  # items already on the worker (0 when it only takes one batch at a time)
    last_dispatch_at: float = -math.inf


@dataclass(frozen=True, slots=True)
class Batch:
    items: tuple[QueueItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def protocol_mix(self) -> str:
        """The common door of every item, or "mixed"; a metrics label."""
        doors = {item.protocol for item in self.items}
        return next(iter(doors)).value if len(doors) == 1 else "mixed"


@dataclass(frozen=True, slots=True)
class Dispatch:
    worker_id: int
    batch: Batch
    dispatched_at: float


@dataclass(slots=True)
class _ServiceTime:
    """EWMA of seconds per dispatched batch: the basis of the Retry-After estimate."""

    seconds: float = 0.1
    alpha: float = 0.2

    def observe(self, seconds: float) -> None:
        self.seconds += self.alpha * (max(0.0, seconds) - self.seconds)


@dataclass
class Scheduler:
    settings: BatchPolicy
    clock: Callable[[], float]
    _queue: deque[QueueItem] = field(default_factory=deque)  # NORMAL items, FIFO
    _low: deque[QueueItem] = field(default_factory=deque)  # LOW items, FIFO
    _service: _ServiceTime = field(default_factory=_ServiceTime)
    low_batch_when_busy: int = 1  # LOW items per batch while NORMAL traffic is recent
    busy_window_s: float = 2.0  # NORMAL traffic this recent counts (a user opening task after task)
    low_share_when_busy: float = 0.25  # of the time, at most, for LOW batches while NORMAL traffic is recent
    _last_normal_at: float = -math.inf  # enqueue time of the latest NORMAL item
    _low_rest_until: float = -math.inf  # while busy, no LOW item goes out before this

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._low)

    @property
    def low_depth(self) -> int:
        return len(self._low)

    def _lane(self, priority: Priority) -> deque[QueueItem]:
        return self._low if priority is Priority.LOW else self._queue

    def retry_after_s(self) -> float:
        """Roughly how long until a full queue has room: the queue in batches times the batch time."""
        batches = math.ceil(max(1, self.depth) / max(1, self.settings.max_batch_size))
        return float(max(1, math.ceil(batches * self._service.seconds)))

    def add(self, item: QueueItem) -> None:
        self.add_all([item])

    def add_all(self, items: Sequence[QueueItem]) -> None:
        """Admit every item or none (the images of one request share a fate)."""
        if self.depth + len(items) > self.settings.max_queue_size:
            raise errors.Overloaded(
                f"queue full ({self.depth}/{self.settings.max_queue_size} waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        for item in items:
            self._lane(item.priority).append(item)
            if item.priority is not Priority.LOW:
                self._last_normal_at = max(self._last_normal_at, item.enqueued_at)

    def requeue(self, items: Iterable[QueueItem]) -> None:
        """Put items back at the head (a worker died under them); bypasses the size cap because
        they were admitted already."""
        for item in reversed(list(items)):
            self._lane(item.priority).appendleft(item)

    def take_all(self) -> list[QueueItem]:
        """Empty the queue (unload / shutdown past its drain timeout)."""
        items = [*self._queue, *self._low]
        self._queue.clear()
        self._low.clear()
        return items

    def expire(self, now: float | None = None) -> list[QueueItem]:
        """Remove and return the items whose deadline has passed; the caller answers them 504."""
        now = self.clock() if now is None else now
        expired: list[QueueItem] = []
        for lane in (self._queue, self._low):
            if any(item.deadline <= now for item in lane):
                expired.extend(item for item in lane if item.deadline <= now)
                kept = [item for item in lane if item.deadline > now]
                lane.clear()
                lane.extend(kept)
        return expired

    def next_batch(self, now: float | None, idle_workers: Sequence[WorkerLoad]) -> Dispatch | None:
        """A batch for the least-loaded idle worker, or None when nothing should go out yet."""
        now = self.clock() if now is None else now
        if not self.depth or not idle_workers:
            return None
        size = self.settings.max_batch_size
        if self.depth < size and now < self._hold_until():
            return None
        items: list[QueueItem] = []
        busy = now - self._last_normal_at < self.busy_window_s
        for lane in (self._queue, self._low):  # NORMAL first; LOW only fills what is left
            if lane is self._low and busy:  # none with NORMAL items; alone, only a few, and resting
                size = len(items) if items or now < self._low_rest_until else min(size, max(1, self.low_batch_when_busy))
            if len(items) < size:
                items += _take_grouped(lane, size - len(items), now, size * SHAPE_LOOKAHEAD,
                                       {item.shape_key for item in items})
        if not items:
            return None
        worker = min(idle_workers, key=lambda w: (w.in_flight, w.last_dispatch_at, w.worker_id))
        return Dispatch(worker_id=worker.worker_id, batch=Batch(tuple(items)), dispatched_at=now)

    def complete(self, dispatch: Dispatch, now: float) -> None:
        """Record how long a batch took; feeds the Retry-After estimate and the LOW lane's rest."""
        ran = now - dispatch.dispatched_at
        self._service.observe(ran)
        if any(item.priority is Priority.LOW for item in dispatch.batch.items):
            share = min(1.0, max(1e-3, self.low_share_when_busy))
            self._low_rest_until = now + max(0.0, ran) * (1.0 / share - 1.0)

    def wake_at(self, now: float | None = None) -> float | None:
        """The next clock time at which `expire` or `next_batch` could answer differently without a
        new add or an idle worker: the earliest deadline, or the end of the batch delay.
        A hold that has already ended is left out: then only an idle worker changes the answer.
        """
        now = self.clock() if now is None else now
        if not self.depth:
            return None
        wake = min(item.deadline for lane in (self._queue, self._low) for item in lane)
        if self._low and now < self._low_rest_until and now - self._last_normal_at < self.busy_window_s:
            wake = min(wake, self._low_rest_until, self._last_normal_at + self.busy_window_s)
        if self.settings.max_batch_delay_ms > 0 and self.depth < self.settings.max_batch_size:
            hold = self._hold_until()
            if hold > now:
                wake = min(wake, hold)
        return wake

    def _hold_until(self) -> float:
        """When the oldest queued item stops waiting for company."""
        oldest = min(lane[0].enqueued_at for lane in (self._queue, self._low) if lane)
        return oldest + self.settings.max_batch_delay_ms / 1000.0


def _take_grouped(lane: deque[QueueItem], want: int, now: float, window: int,
                  batch_keys: set[Hashable | None]) -> list[QueueItem]:
    """Up to `want` live items from the first `window` live items of `lane`, by shape group (module docstring).

    A group is every item of one key (an item without a key is a group of its own), ranked by its oldest
    item; groups whose key is already in the batch rank first. Items not taken, expired ones included,
    keep their places, so `expire` still finds them. With no keys this is FIFO.
    """
    head: list[QueueItem] = []
    live: list[int] = []  # indices into head; expired items do not count towards the window
    while lane and len(live) < window:
        head.append(lane.popleft())
        if head[-1].deadline > now:
            live.append(len(head) - 1)

    def group(i: int) -> tuple:
        key = head[i].shape_key
        return ("item", i) if key is None else ("key", key)

    rank: dict[tuple, int] = {}
    for r, i in enumerate(live):
        key = head[i].shape_key
        rank.setdefault(group(i), -1 if key is not None and key in batch_keys else r)
    picked = sorted(live, key=lambda i: (rank[group(i)], i))[:want]
    taken = set(picked)
    lane.extendleft(reversed([item for i, item in enumerate(head) if i not in taken]))
    return [head[i] for i in picked]
