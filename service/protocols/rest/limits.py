"""Per-connection bounds uvicorn lacks: header size and count, a header read timeout and a body
read timeout, a send timeout for answers the client does not read, plus cutting unfinished
uploads at the end of a drain.

uvicorn (httptools) accumulates an unfinished request line and headers without limit, and once a
byte has arrived its keep-alive timer is off, so a client that sends headers or a body slowly holds
the connection (and the memory) forever. The bounds live in a small subclass of uvicorn's httptools
protocol, cheap on the hot path: a phase flag flipped by parser callbacks it already makes, and a
byte count only while headers are incomplete. Timeouts need no per-request timer: one sweeper task
per listener looks at each connection's phase once per tick, stamps when it first saw that phase,
and acts when it lasts too long.

What a client gets: 431 (JSON) for headers over the limits, 408 (JSON) for headers not received in
time and, through the app's error table, 408 for a body not received in time and 503 for a body
still uploading when the drain ends. The body cases go through the app because the request is
already running there: the sweeper marks the request's scope and wakes its receive(), and
RequestContextMiddleware raises the marked error on the next body message.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import termios
import time

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ...errors import DetserveError, ModelNotReady, RequestTimeout
from ...settings import ServerLimits
from .app import CUT_KEY

log = logging.getLogger("detserve.rest")

SWEEP_TICK_S = 0.5
# Body bytes gathered before the app is woken. uvicorn wakes it per TCP read and pauses reading past
# 64 KiB, so a 265 KB upload took ~5 trips through the event loop and the middleware stack, each with a
# copy of the chunk; gathered, it takes one (measured with wrk and the null model: see bench/analysis.md).
BODY_BUFFER_BYTES = 1 << 20

_IDLE, _HEADERS, _BODY, _REFUSED = 0, 1, 2, 3


class _Refused(Exception):
    """Raised from a parser callback to stop httptools mid-chunk once the connection is refused."""


def _raw_json_response(status: int, reason: str, code: str, message: str, path: bytes = b"") -> bytes:
    body = {"code": code, "message": message, "request_id": ""}
    if path.startswith(b"/v2/"):
        body["error"] = message  # the Open Inference Protocol's field, as app.error_response adds it
    body = orjson.dumps(body)
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii")
    return head + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header bounds and the phase the sweeper reads."""

    limits: ServerLimits = ServerLimits()  # set per listener by `bounded_protocol`
    body_buffer_bytes: int = BODY_BUFFER_BYTES  # never above max_request_size: the 413 must not wait for it
    direct = None  # the inference listener's DirectDoor (rest/direct.py), set by `bounded_protocol`
    refusal: bytes | None = None  # a 431/408 waiting for the answers of requests pipelined before it

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.running_cycles: list = []  # cycles still answering behind a pipelined request (at most a few)
        # A fresh connection that sends nothing is a header read that has not finished.
        self.phase, self.phase_seen_at, self.header_bytes, self.parsed_header_bytes = _HEADERS, None, 0, 0
        self.unsent, self.unsent_since = 0, None  # answer bytes in the transport's buffer, stalled since

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase != _HEADERS:
            if phase != _REFUSED:
                self._feed(data)
            return
        self.header_bytes += len(data)
        self._feed(data)
        # Checked after parsing: a chunk that completes the headers may carry body bytes too.
        if self.phase == _HEADERS and self.header_bytes > self.limits.max_header_bytes:
            self.refuse(431, "Request Header Fields Too Large", "headers_too_large",
                        f"request line and headers exceed {self.limits.max_header_bytes} bytes")

    def _feed(self, data: bytes) -> None:
        # uvicorn's data_received, except for an Upgrade it does not take (any but a WebSocket one).
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.logger.warning("Invalid HTTP request received: %s", exc)
            self.send_400_response(f"invalid HTTP request: {str(exc)[:200]}")
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._ignore_upgrade(data[upgrade.args[0]:])

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Go on in HTTP/1.1 after a request asked to upgrade (`curl --http2` sends `Upgrade: h2c`).

        llhttp ends an upgrade request at its headers, since what follows would be the new protocol,
        so uvicorn answered it with an empty body ("empty request body" for `curl --http2 -T img`) and
        never parsed another request on the connection. RFC 9110 section 7.8: a server that does not
        switch ignores the header. A second parser takes over: fed this request's framing headers,
        then the bytes that followed, it hands only the body to this protocol until the message ends,
        and everything after that, so keep-alive and pipelining work as on any connection.
        """
        framing = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers
                           if name in (b"content-length", b"transfer-encoding"))
        cycle = self.cycle
        if framing and cycle is not None and not cycle.response_complete:
            # on_message_complete already ran, but the app has not run since: undo it.
            cycle.more_body = True
            cycle.message_event.clear()
            self.phase, self.phase_seen_at = _BODY, None
        self.parser = httptools.HttpRequestParser(_AfterIgnoredUpgrade(self))
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's own parser
        self._feed(b"POST / HTTP/1.1\r\n" + framing + b"\r\n" + rest)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # header_bytes was reset when the previous message ended: this chunk is already counted.
        self.phase, self.phase_seen_at, self.parsed_header_bytes = _HEADERS, None, 0

    # data_received counts the bytes of headers still arriving; these count the parsed ones, so
    # headers that arrive whole in one read (or behind a keep-alive request) meet the same limit.
    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # first: a refusal reads the path (the V2 "error" field) from self.url
        self._count_parsed(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_parsed(self, size: int) -> None:
        self.parsed_header_bytes += size
        if self.parsed_header_bytes > self.limits.max_header_bytes:
            self.refuse(431, "Request Header Fields Too Large", "headers_too_large",
                        f"request line and headers exceed {self.limits.max_header_bytes} bytes")
            raise _Refused

    def on_headers_complete(self) -> None:
        if len(self.headers) > self.limits.max_headers:
            self.refuse(431, "Request Header Fields Too Large", "headers_too_large",
                        f"{len(self.headers)} headers; at most {self.limits.max_headers} are accepted")
            raise _Refused  # uvicorn reports it as a parser error, whose 400 send_400_response skips
        self.phase, self.phase_seen_at = _BODY, None
        running = self.cycle
        super().on_headers_complete()
        if running is not None and running is not self.cycle and not running.response_complete:
            # A pipelined request took self.cycle while this one still runs: uvicorn's
            # connection_lost would wake only the newer one, and a handler waiting for the
            # disconnect (a long Label Studio /predict) would never hear of it.
            self.running_cycles = [c for c in self.running_cycles if not c.response_complete] + [running]

    def _start_asgi_task(self, cycle, app) -> None:
        # Called for each request, pipelined ones included, once the one before it is answered.
        # `app` is not self.app when uvicorn's concurrency limit answers 503 instead.
        direct = self.direct
        if direct is not None and app is self.app and not self.config.reset_contextvars:
            route = direct.accepts(cycle.scope, app)
            if route is not None:
                task = self.loop.create_task(direct.run(cycle, route))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
                return
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        for cycle in self.running_cycles:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.running_cycles.clear()
        super().connection_lost(exc)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        if not isinstance(cycle.body, bytearray):  # receive() resets it to b"": += on bytes is quadratic
            cycle.body = bytearray(cycle.body)
        cycle.body += body
        if len(cycle.body) > self.body_buffer_bytes:
            self.flow.pause_reading()
            cycle.message_event.set()
        # else: on_message_complete wakes the app with the whole body

    def on_message_complete(self) -> None:
        self.phase, self.header_bytes = _IDLE, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's is text/plain; every other answer of ours is the JSON error shape.
        if self.phase != _REFUSED:
            self.refuse(400, "Bad Request", "invalid_request", msg)

    def refuse(self, status: int, reason: str, code: str, message: str) -> None:
        """Answer before any request exists (so not through the app) and close."""
        self.phase = _REFUSED
        if not self.transport.is_closing():
            # The path is what httptools has parsed so far (on_url comes before the headers).
            path = bytes(getattr(self, "url", b"") or b"")
            self.refusal = _raw_json_response(status, reason, code, message, path)
            if not self._answering():
                self._send_refusal()
            # else: pipelined behind requests still answering, whose answers must go out first;
            # on_response_complete sends it after the last of them. Meanwhile input is dropped.

    def _answering(self) -> bool:
        cycle = self.cycle  # the latest request parsed: the last of any pipeline
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

    def _send_refusal(self) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is not None and not self.transport.is_closing():
            self.transport.write(refusal)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.refusal is not None and not self._answering():
            self._unset_keepalive_if_required()
            self._send_refusal()

    def cut_body(self, error: DetserveError) -> bool:
        """Make the running request's next receive() raise `error`; False when it is past that."""
        cycle = self.cycle
        if cycle is None or cycle.response_started or cycle.response_complete or not cycle.more_body:
            return False
        cycle.scope[CUT_KEY] = error
        cycle.keep_alive = False  # the rest of the body is never read: close after the answer
        cycle.message_event.set()
        return True

    def sweep(self, now: float) -> None:
        if self.transport is None or self._unread_too_long(now):
            return
        phase = self.phase
        if phase in (_IDLE, _REFUSED) or self.transport.is_closing():
            return
        if self.phase_seen_at is None:
            self.phase_seen_at = now
            return
        waited = now - self.phase_seen_at
        if phase == _HEADERS and waited > self.limits.header_timeout_s:
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a pipelined request behind one still running: its own time has not begun
            if self.header_bytes == 0:
                # Nothing sent yet (a pooled connection never used): close quietly, like keep-alive
                # expiry, so a client racing a first request never reads an answer it did not ask for.
                self.phase = _REFUSED
                self.transport.close()
                return
            self.refuse(408, "Request Timeout", "request_timeout",
                        f"request headers not received within header_timeout_s ({self.limits.header_timeout_s:g} s)")
        elif phase == _BODY and waited > self.limits.body_timeout_s:
            cut = self.cut_body(RequestTimeout(
                f"request body not received within body_timeout_s ({self.limits.body_timeout_s:g} s)"))
            if not cut:
                self.transport.close()
            self.phase = _IDLE


    def _unread_too_long(self, now: float) -> bool:
        """Abort a connection whose client has read nothing of its answer for send_timeout_s.

        The answer sits in the transport's buffer until the client reads it (a drawing of a large
        image is 20-70 MB from a small upload), and neither keep-alive expiry nor close() drops it:
        close() waits for the buffer to flush. So a client that never reads held that memory for as
        long as it kept the socket open. Progress is any shrinking, between two sweeps, of what is
        unsent: the transport's buffer plus the kernel's send queue. The buffer alone shrinks only
        when the kernel's queue has drained a long way (a client reading 20 KB/s went 57 s without
        shrinking it). abort() drops the buffer and resets the connection."""
        pending = self.transport.get_write_buffer_size()
        if pending:
            pending += _kernel_send_queue(self.transport)
        if pending == 0 or pending < self.unsent:
            self.unsent, self.unsent_since = pending, None
            return False
        self.unsent = pending
        if self.unsent_since is None:
            self.unsent_since = now
            return False
        if now - self.unsent_since <= self.limits.send_timeout_s:
            return False
        log.warning("aborting a connection whose client read none of %d answer bytes in send_timeout_s (%g s)",
                    pending, self.limits.send_timeout_s)
        self.phase = _REFUSED
        self.transport.abort()
        return True


def _kernel_send_queue(transport) -> int:
    """Bytes the kernel holds for the socket that the peer has not acknowledged (Linux TIOCOUTQ);
    0 where that cannot be asked."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 0


class _AfterIgnoredUpgrade:
    """Callbacks of the parser that replaces llhttp's after an ignored Upgrade (see _ignore_upgrade).

    The replayed head of the upgrade request is parsed again only for its framing, so until that
    message ends only its body goes through; every later message goes to the protocol whole.
    """

    def __init__(self, protocol: BoundedHttpToolsProtocol):
        self.protocol = protocol
        self.replaying = True

    def on_message_begin(self) -> None:
        if not self.replaying:
            self.protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.replaying:
            self.protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.replaying:
            self.protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.replaying:
            self.protocol.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.protocol.on_body(body)

    def on_message_complete(self) -> None:
        self.replaying = False
        self.protocol.on_message_complete()


def bounded_protocol(limits: ServerLimits, max_request_size: int | None = None,
                     direct=None) -> type[BoundedHttpToolsProtocol]:
    gather = BODY_BUFFER_BYTES if max_request_size is None else min(BODY_BUFFER_BYTES, max_request_size + 1)
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"limits": limits, "body_buffer_bytes": gather, "direct": direct})


async def sweep_forever(servers, tick_s: float = SWEEP_TICK_S) -> None:
    """Run the timeouts of every connection of `servers` (uvicorn.Server objects) until cancelled."""
    while True:
        await asyncio.sleep(tick_s)
        now = time.monotonic()
        for server in servers:
            for connection in list(server.server_state.connections):
                sweep = getattr(connection, "sweep", None)
                if sweep is not None:
                    with contextlib.suppress(Exception):  # one odd connection must not stop the sweeper
                        sweep(now)


def cut_unfinished_uploads(servers) -> int:
    """At the end of the drain: every request still receiving its body is answered 503 (JSON)
    instead of being cancelled by uvicorn into a plain-text 500. Returns how many were cut."""
    cut = 0
    for server in servers:
        for connection in list(server.server_state.connections):
            cut_body = getattr(connection, "cut_body", None)
            if cut_body is not None and cut_body(ModelNotReady(
                    "the server is shutting down and the request body did not arrive before the drain timeout")):
                cut += 1
    if cut:
        log.warning("drain timeout: answered 503 to %d request(s) still uploading", cut)
    return cut
