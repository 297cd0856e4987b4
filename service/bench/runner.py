"""Closed-loop and open-loop load on one event loop.

Closed loop: `concurrency` tasks, each sending its next request as soon as the last one answers.
Open loop: requests start on a fixed schedule (`rate` per second) whatever the server does;
latency counts from the scheduled start, so a stalled server is not hidden by the client waiting
(coordinated omission).

A run is a warm-up (nothing recorded) followed by the measured window, which ends after
`requests` measured starts or `duration_s` seconds, whichever comes first; in-flight requests
then finish (bounded by `timeout_s`) and count.
"""
from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from .stats import RunResult, summarize
from .targets import Target


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int | None = 16  # closed loop; None with `rate` set
    rate: float | None = None  # open loop, requests/s
    requests: int | None = None
    duration_s: float | None = 10.0
    warmup_s: float = 2.0
    timeout_s: float = 60.0
    max_in_flight: int = 1024  # open loop: beyond this, a scheduled request is dropped (code "dropped")
    progress: bool = True

    def __post_init__(self):
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give requests or duration_s (or both)")


class _Recorder:
    def __init__(self):
        self.latencies: list[float] = []
        self.codes: list[str] = []
        self.last_done = 0.0

    def add(self, code: str, latency: float, done: float) -> None:
        self.codes.append(code)
        if code == "ok":
            self.latencies.append(latency)
        self.last_done = max(self.last_done, done)


async def _timed_send(target: Target, index: int, timeout_s: float) -> str:
    try:
        return await asyncio.wait_for(target.send(index), timeout_s)
    except asyncio.TimeoutError:
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - every failure is a counted outcome, never a crash
        return type(exc).__name__


class _Progress:
    def __init__(self, enabled: bool, total: int | None, desc: str):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False,
                             mininterval=0.5, dynamic_ncols=True)
        self._shown = 0

    def refresh(self, done: int, errors: int) -> None:
        if self._bar is not None and done > self._shown:
            self._bar.update(done - self._shown)
            self._bar.set_postfix(errors=errors, refresh=False)
            self._shown = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_load(target: Target, spec: LoadSpec, label: str = "") -> RunResult:
    """Run warm-up + measured window against an opened target."""
    rec = _Recorder()
    counter = 0
    loop_start = time.perf_counter()
    measure_start = loop_start + spec.warmup_s
    deadline = measure_start + spec.duration_s if spec.duration_s is not None else float("inf")
    started_measured = 0
    desc = label or target.name
    progress = _Progress(spec.progress, spec.requests, desc)

    def may_start(now: float) -> tuple[bool, bool]:
        """(start another?, is it measured?)"""
        nonlocal started_measured
        if now < measure_start:
            return True, False
        if now >= deadline or (spec.requests is not None and started_measured >= spec.requests):
            return False, False
        started_measured += 1
        return True, True

    async def closed_worker() -> None:
        nonlocal counter
        while True:
            start = time.perf_counter()
            go, measured = may_start(start)
            if not go:
                return
            index = counter
            counter += 1
            code = await _timed_send(target, index, spec.timeout_s)
            if measured:
                done = time.perf_counter()
                rec.add(code, done - start, done)

    in_flight: set[asyncio.Task] = set()

    async def open_one(index: int, scheduled: float, measured: bool) -> None:
        code = await _timed_send(target, index, spec.timeout_s)
        if measured:
            done = time.perf_counter()
            rec.add(code, done - scheduled, done)

    async def open_scheduler() -> None:
        nonlocal counter
        interval = 1.0 / spec.rate
        k = 0
        while True:
            scheduled = loop_start + k * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            go, measured = may_start(scheduled)
            if not go:
                return
            k += 1
            if len(in_flight) >= spec.max_in_flight:
                if measured:
                    rec.add("dropped", 0.0, time.perf_counter())
                continue
            task = asyncio.create_task(open_one(counter, scheduled, measured))
            counter += 1
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress.refresh(len(rec.codes), len(rec.codes) - len(rec.latencies))

    tick = asyncio.create_task(ticker())
    try:
        if spec.concurrency is not None:
            await asyncio.gather(*(closed_worker() for _ in range(spec.concurrency)))
        else:
            await open_scheduler()
            if in_flight:
                await asyncio.gather(*list(in_flight))
    finally:
        tick.cancel()
        progress.refresh(len(rec.codes), len(rec.codes) - len(rec.latencies))
        progress.close()
    window = (rec.last_done - measure_start) if rec.codes else 0.0
    return summarize(label or target.name, target.name, rec.latencies, rec.codes, window,
                     concurrency=spec.concurrency, rate=spec.rate)


async def run_sweep(target: Target, specs: list[LoadSpec], label: str = "") -> list[RunResult]:
    """Open the target once (connections are reused between levels) and run each level."""
    await target.open()
    try:
        results = []
        for spec in specs:
            level = f"c={spec.concurrency}" if spec.concurrency is not None else f"rate={spec.rate:g}"
            results.append(await run_load(target, spec, f"{label or target.name} {level}"))
        return results
    finally:
        await target.close()
