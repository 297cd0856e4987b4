"""What both gRPC servicers share: error mapping, deadlines, metrics and the ordered stream window."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from ...errors import DeadlineExceeded, DetserveError, InternalError, grpc_status
from ...engine.dataplane import DataPlane
from ...settings import default_model_name

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Frames a stream may have in flight; the reader stops pulling (and HTTP/2 flow control pushes back
# on the client) until the oldest one is answered.
STREAM_WINDOW = 8
ERROR_CODE_KEY = "detserve-error"


def status_code(err: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[grpc_status(err)]


def as_detserve_error(exc: BaseException, *, quiet: bool = False) -> DetserveError:
    if isinstance(exc, DetserveError):
        return exc
    if not quiet:
        log.error("unexpected error in a gRPC handler", exc_info=exc)
    return InternalError(f"internal error: {type(exc).__name__}")


def timeout_from(context: grpc.aio.ServicerContext) -> float | None:
    """The client's remaining deadline, passed to the engine as its request timeout. One already
    spent is DEADLINE_EXCEEDED (retryable with a longer deadline), not the engine's INVALID_ARGUMENT
    for a timeout of 0."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before its images were queued")
    return remaining


class Call:
    """What a handler learns while it runs: the model name once resolved (an empty name becomes
    the default model), so the metric is labelled with it; unknown names fold into one label."""

    __slots__ = ("model",)

    def __init__(self, model: str):
        self.model = model


@asynccontextmanager
async def recorded(dp: DataPlane, model: str, protocol: str | None):
    """Time one request and record its metric with the status it ends in; re-raise failures.
    `protocol=None` records nothing: metadata calls are not inference requests."""
    start = time.perf_counter()
    call = Call(model)

    def record(code: str) -> None:
        if protocol is not None:
            dp.record(call.model, protocol, code, time.perf_counter() - start)

    try:
        yield call
    except asyncio.CancelledError:
        record(grpc.StatusCode.CANCELLED.name)
        raise
    except Exception as exc:
        record(status_code(as_detserve_error(exc, quiet=True)).name)
        raise
    else:
        record(grpc.StatusCode.OK.name)


@asynccontextmanager
async def door(context: grpc.aio.ServicerContext, dp: DataPlane, model: str, protocol: str | None):
    """`recorded`, then any failure leaves as the error table's status (never a traceback)."""
    try:
        async with recorded(dp, model, protocol) as call:
            yield call
    except Exception as exc:  # noqa: BLE001
        fail(context, exc)  # and the handler returns None: grpc then sends the status set here


def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Set the table's status for the call, which ends when the handler returns; trailing metadata
    carries the precise error code (several codes share one gRPC status) and, for a full queue,
    when to retry. Not context.abort(): it raises, and grpc keeps that error in a reference cycle
    with the handler's frames, so every failed call's request (a 10 MB image) stayed in memory
    until the cycle collector ran (five bad 10 MB calls: +1.4 GB)."""
    err = as_detserve_error(exc)
    trailers = [(ERROR_CODE_KEY, err.code)]
    if err.retry_after_s is not None:
        # Seconds, fractions allowed (unlike HTTP's Retry-After): gRPC clients parse it themselves.
        trailers.append(("retry-after", f"{err.retry_after_s:.3g}"))
    context.set_trailing_metadata(tuple(trailers))
    context.set_code(status_code(err))
    context.set_details(err.message)


async def ordered_window(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]], window: int = STREAM_WINDOW
) -> AsyncIterator[Resp]:
    """Run `handle` on each request concurrently, at most `window` at a time, yielding in request order.

    `handle` must turn per-item failures into a response; an exception from the request iterator
    itself (a broken stream, an undecodable message) ends the stream with that error.
    """
    slots = asyncio.Semaphore(window)
    pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                pending.put_nowait(asyncio.create_task(handle(request)))
        finally:
            pending.put_nowait(None)

    reader = asyncio.create_task(read())
    in_flight: list[asyncio.Task] = []
    try:
        while (task := await pending.get()) is not None:
            in_flight.append(task)
            result = await task
            in_flight.remove(task)
            slots.release()
            yield result
        await reader  # re-raise the reader's error, if any
    finally:
        reader.cancel()
        for task in in_flight + _drain(pending):
            task.cancel()


def _drain(queue: asyncio.Queue) -> list[asyncio.Task]:
    tasks = []
    while not queue.empty():
        item = queue.get_nowait()
        if item is not None:
            tasks.append(item)
    return tasks


def resolve_model(dp: DataPlane, default_model: str | None, name: str) -> str:
    """An empty model name means the default model (settings.default_model_name: every entry point's rule)."""
    if name:
        return name
    return default_model_name(default_model, [m.name for m in dp.engine.models()])
