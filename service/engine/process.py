"""The front process's end of one worker process: start it, write requests, read results.

Everything runs on the event loop: requests go down a socketpair written without blocking, results
come up a separate one-way pipe read without blocking (add_reader and multiprocessing's own
framing). The pool (pool.py) decides what to send and what a message or an exit means.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import struct
import threading
import time
from typing import Callable

from .arena import FrontArena
from . import messages
from .messages import BatchRequest, BatchResult, WorkerReady, WorkerSpec
from .worker import worker_main

log = logging.getLogger("detserve.engine")


PRELOAD = "service.engine.forkserver_preload"
_contexts: dict[str, mp.context.BaseContext] = {}
_contexts_lock = threading.Lock()
# How long a probe may wait for a running forkserver (it answers in ~30 ms); past it the forkserver
# is taken as hung (stopped, swapped out) and replaced. A probe that starts one waits for it to import
# torch (~1.5 s warm, far longer from a cold disk or a starved node), so it gets FIRST_START_TIMEOUT_S.
PROBE_TIMEOUT_S = 60.0
FIRST_START_TIMEOUT_S = 600.0
# How long the exit status of a worker whose pipe closed is waited for: it comes through the
# forkserver, which may itself be stopped; the worker is gone either way.
EXIT_STATUS_WAIT_S = 5.0


def worker_context(method: str) -> mp.context.BaseContext:
    """The context `prepare_worker_context` made for `method` (made now, if it never ran)."""
    with _contexts_lock:
        ctx = _contexts.get(method)
    return ctx if ctx is not None else prepare_worker_context(method)


def prepare_worker_context(method: str) -> mp.context.BaseContext:
    """The multiprocessing context workers start from: "forkserver" (torch imported once, in the
    forkserver, and shared by every worker forked from it) or "spawn" (every worker imports it).

    Call it from a thread before launching (`ProcessPool._prepare`): for "forkserver" it forks a probe
    process each time, which (re)starts a forkserver that is not running and returns once the
    forkserver has imported torch (~1.5 s the first time, ~30 ms after). On the event loop that wait
    would stall every door; a forkserver that died (an OOM kill) is restarted here, not in a launch.
    A forkserver that cannot start (no writable temporary folder for its socket) falls back to spawn."""
    with _contexts_lock:
        ctx = _contexts.get(method)
        if ctx is None:
            ctx = mp.get_context(method)
            if method == "forkserver":
                ctx.set_forkserver_preload([PRELOAD])
        if ctx.get_start_method() == "forkserver":
            try:
                try:
                    _probe(ctx)
                except EOFError:  # it died while importing, or _probe killed it as hung: once more
                    _probe(ctx)
            except (OSError, EOFError) as exc:
                log.warning("cannot start the worker forkserver (%s); workers start by spawn, each importing "
                            "torch", exc)
                ctx = mp.get_context("spawn")
        _contexts[method] = ctx
        return ctx


def _probe(ctx: mp.context.BaseContext) -> None:
    """Fork one process that exits at once. A forkserver that does not answer within PROBE_TIMEOUT_S
    is killed, so the wait (which nothing else can interrupt) ends in EOFError and the next start
    makes a new one; unbounded, a stopped forkserver stalled every restart and scale call."""
    timeout = PROBE_TIMEOUT_S if _forkserver_pid() is not None else FIRST_START_TIMEOUT_S
    watchdog = threading.Timer(timeout, _kill_forkserver, args=(timeout,))
    watchdog.daemon = True
    watchdog.start()
    try:
        probe = ctx.Process(target=os.getpid, daemon=True)
        probe.start()
        probe.join(timeout)
    finally:
        watchdog.cancel()
    if probe.exitcode != 0:
        if probe.exitcode is None:
            probe.kill()
        raise OSError(f"its probe process ended with {probe.exitcode}")


def _forkserver_pid() -> int | None:
    """The forkserver's pid while it runs (stopped counts; dead and not yet reaped does not: the
    next start reaps it and starts another)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # private: no public handle exists
    if not pid:
        return None
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def _kill_forkserver(timeout: float) -> None:
    pid = _forkserver_pid()
    if pid:
        log.warning("the worker forkserver (pid %s) did not answer within %.0f s; replacing it", pid, timeout)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class WorkerProcess:
    """One worker process. No helper threads fight the loop for the GIL (measured: they cost
    milliseconds per batch on a loaded box), and a frozen worker can never stall the loop."""

    def __init__(self, spec: WorkerSpec, loop: asyncio.AbstractEventLoop, *, name: str,
                 on_message: Callable[["WorkerProcess", object], None],
                 on_exit: Callable[["WorkerProcess", str], None], start_method: str = "forkserver"):
        ctx = worker_context(start_method)
        # A forked worker inherits the forkserver's environment, captured when it started: send the
        # front's as it is now (spawn passes it implicitly).
        spec = dataclasses.replace(spec, environ=dict(os.environ))
        self.arena = FrontArena.create()
        self.arena_mapped = False  # until the worker says it mapped the arena, payloads go inline
        if self.arena is not None:
            spec = dataclasses.replace(spec, arena=self.arena.spec())
        self.conn, child_requests = ctx.Pipe(duplex=True)
        results_reader, child_results = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=worker_main, args=(child_requests, child_results, spec), daemon=True,
                                   name=name)
        self.process.start()
        # Else the parent holds the child's ends open and never sees EOF when the child dies.
        child_requests.close()
        child_results.close()
        self.started_at = self.last_heartbeat = time.monotonic()
        self.kill_reason: str | None = None
        self.killed_at = 0.0
        self._on_message, self._on_exit, self._loop = on_message, on_exit, loop
        self._results = results_reader
        self._frames = FrameReader()
        os.set_blocking(results_reader.fileno(), False)
        loop.add_reader(results_reader.fileno(), self._on_readable)
        self._unsent = bytearray()  # request bytes the socket would not take yet
        os.set_blocking(self.conn.fileno(), False)
        widen_send_buffer(self.conn.fileno())

    def send(self, message) -> None:
        """Non-blocking: write what the socket takes now, the rest when it is writable again, so
        a large batch or a frozen worker never blocks the loop (and no sender thread is needed)."""
        if self.arena_mapped and isinstance(message, BatchRequest):
            message = self.arena.place(message)
        try:
            payload = messages.dumps(message)
        except Exception:
            if isinstance(message, BatchRequest) and self.arena is not None:
                self.arena.release(message.batch_id)  # else the arena stays held and every payload goes inline
            raise
        self._unsent += struct.pack("!i", len(payload))
        self._unsent += payload
        if len(self._unsent) == len(payload) + 4:  # nothing was pending: try right away
            self._flush()

    def _flush(self) -> None:
        fd = self.conn.fileno()
        try:
            while self._unsent:
                written = os.write(fd, self._unsent)
                del self._unsent[:written]
        except BlockingIOError:
            self._loop.add_writer(fd, self._flush)
            return
        except OSError:
            self._unsent.clear()  # the worker is gone; the results pipe reports the exit
        self._loop.remove_writer(fd)

    def kill(self, reason: str) -> None:
        """SIGKILL by pid while the results pipe is open: the worker holds its end until it exits, so
        the pid is still its own. Not Process.kill(): once the forkserver dies, multiprocessing marks
        every child it forked as exited (code 255) at the next start, and kill() then sends nothing."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.killed_at = time.monotonic()
            log.warning("killing worker pid %s: %s", self.process.pid, reason)
        if not self._results.closed:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except OSError:  # already gone
                pass

    def _on_readable(self) -> None:
        fd = self._results.fileno()
        eof = False
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self._frames.feed(chunk)
        for frame in self._frames.frames():
            try:
                message = messages.loads(frame)
            except Exception:  # noqa: BLE001 - one unreadable message; frames stay aligned
                log.exception("unreadable message from worker pid %s", self.process.pid)
                continue
            if isinstance(message, BatchResult) and self.arena is not None:
                self.arena.release(message.batch_id)
            elif isinstance(message, WorkerReady):
                self.arena_mapped = self.arena is not None and message.arena_mapped
                if self.arena is not None and not message.arena_mapped:
                    log.warning("worker pid %s could not map its shared-memory arena (is /proc mounted with "
                                "hidepid?): its images are pickled through the pipe", self.process.pid)
            self._on_message(self, message)
        if eof:
            self._loop.remove_reader(fd)
            self._results.close()
            self._loop.remove_writer(self.conn.fileno())
            self._loop.create_task(self._reap())

    async def _reap(self) -> None:
        await self._loop.run_in_executor(None, self._join)
        self.conn.close()
        if self.arena is not None:
            self.arena.close()
            self.arena = None
            self.arena_mapped = False
        code = self.process.exitcode
        self._on_exit(self, self.kill_reason or (f"exit code {code}" if code is not None else
                                                 "exit status unknown: the forkserver did not report it"))

    def _join(self) -> None:
        """Bounded: the pipe's EOF already says the worker is gone; only its status may be late."""
        self.process.join(EXIT_STATUS_WAIT_S)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(1.0)


def widen_send_buffer(fd: int, size: int = 8 << 20) -> None:
    """Ask for room for a whole batch of large images in one write: every refill of a small buffer
    costs a loop wake-up plus a worker wake-up (measured: 1.6 MB took ~11 ms at the default size on
    a loaded 2-core box). The kernel caps it at net.core.wmem_max; best effort."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass
    finally:
        sock.close()


class FrameReader:
    """multiprocessing.Connection framing: a big-endian int32 length (-1: a uint64 length follows)."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk

    def frames(self):
        buf = self._buffer
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            header = 4
            if size == -1:
                if len(buf) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buf, 4)
                header = 12
            if len(buf) < header + size:
                return
            frame = bytes(buf[header:header + size])
            del buf[:header + size]
            yield frame
