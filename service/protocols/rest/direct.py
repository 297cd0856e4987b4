"""The direct door: raw-body PUT/POST /predictions and KServe V2 infer answered from uvicorn's
HTTP protocol, without ASGI.

uvicorn still parses the request, bounds it (rest/limits.py), keeps the connection alive and
queues pipelined requests. The door replaces only what runs between "headers complete" and
"response written": the ASGI task's wrappers (uvicorn's proxy-headers middleware, the app's
`__call__`, RequestContextMiddleware's `send`/`receive` wrappers), the ASGI message dicts, and
Starlette's Request object and response call, and for V2 FastAPI's whole stack. With the null
model those were about a fifth of the front process's CPU on /predictions (bench/analysis.md,
"The direct door").

It runs the same steps, with the same helpers, as RequestContextMiddleware and the ASGI fast
door (app.py) do: the request id, the declared and the streamed body limit, a body cut by the
sweeper, the token check, the route's core (`torchserve.predict_call`, `kserve_v2.infer_call`),
the error table, the access log, the 503 of a drain that ends mid-request and the last-resort 500.

Left to ASGI (`accepts` says None): every other path and method, multipart bodies (Starlette
parses them), X-Forwarded-* headers from a trusted proxy (uvicorn's proxy middleware rewrites the
client address from them; from anyone else both paths ignore them), an app whose fast door is
off (CORS, a root path, the parity tests), and the 503s of uvicorn's concurrency limit.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.datastructures import QueryParams
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from ...engine.dataplane import dataplane_for
from ...errors import ClientClosedRequest, DetserveError
from ...observability.logging import clean_request_id, request_id_var
from . import torchserve
from .app import (InferenceApp, check_body_chunk, check_token, declared_too_large, detserve_error_response,
                  first_values, internal_error_response, log_request, shutdown_response)

log = logging.getLogger("detserve.rest")

# uvicorn's ProxyHeadersMiddleware reads these to rewrite the client and scheme; ASGI keeps that job.
_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
_MULTIPART = b"multipart/form-data"


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _nothing() -> None:
    return None


def _from_trusted_proxy(scope, asgi_app) -> bool:
    """Whether uvicorn's ProxyHeadersMiddleware (if it wraps the app) trusts this client's headers."""
    client = scope.get("client")
    while asgi_app is not None and not isinstance(asgi_app, InferenceApp):
        trusted = getattr(asgi_app, "trusted_hosts", None)
        if trusted is not None:
            return (client[0] if client else None) in trusted
        asgi_app = getattr(asgi_app, "app", None)
    return False


class DirectDoor:
    def __init__(self, app: InferenceApp):
        self.app = app
        try:  # an optional router (app.py OPTIONAL_ROUTERS): without it, V2 is FastAPI's 404
            from . import kserve_v2
        except ImportError:
            kserve_v2 = None
        self.kserve_v2 = kserve_v2

    def accepts(self, scope, asgi_app):
        """(route's core, model, version) when this door answers the request, else None (ASGI
        does). `asgi_app`: what uvicorn would run instead (the app inside uvicorn's middleware)."""
        method, path = scope["method"], scope["path"]
        route, core = torchserve.match_predictions(method, path), self._predictions
        if route is None and self.kserve_v2 is not None:
            route, core = self.kserve_v2.match_infer(method, path), self._v2_infer
        if route is None or scope.get("root_path") or not self.app.fast_door_ready():
            return None
        for name, value in scope["headers"]:
            if name == b"content-type" and value[:19].lower() == _MULTIPART:
                return None
            if name in _PROXY_HEADERS and _from_trusted_proxy(scope, asgi_app):
                return None
        return core, *route

    async def run(self, cycle, route) -> None:
        """Answer one request on uvicorn's RequestResponseCycle `cycle` (its connection state)."""
        scope = cycle.scope
        headers = first_values(scope["headers"])
        request_id = clean_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 0
        try:
            response = await self._respond(cycle, headers, route, request_id)
            status = response.status_code
            await write_response(cycle, response, request_id)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the drain timeout ends: answer in the table's shape,
            # and close, so that a request pipelined behind this one is never started (uvicorn's
            # shutdown() only marks the connection's newest cycle as the last).
            cycle.keep_alive = False
            if not cycle.response_started:
                status = 503
                with contextlib.suppress(Exception):
                    await write_response(cycle, shutdown_response(request_id, scope["path"]), request_id)
            raise
        except Exception:  # noqa: BLE001 - the last resort: should never happen, so log it loudly
            log.exception("unhandled error serving %s %s", scope["method"], scope["path"])
            if not cycle.response_started:
                status = 500
                await write_response(cycle, internal_error_response(request_id, scope["path"]), request_id)
            else:
                cycle.transport.close()
        finally:
            cycle.on_response = _nothing  # as uvicorn's run_asgi: a pipelined request starts once
            log_request(scope, status, started, request_id)
            request_id_var.reset(token)

    async def _respond(self, cycle, headers: dict[bytes, bytes], route, request_id: str):
        state = self.app.state
        limit = state.settings.max_request_size
        path = cycle.scope["path"]
        try:
            too_large = declared_too_large(headers, limit)
            if too_large is not None:
                raise too_large
            if state.auth is not None:
                check_token(state, "inference", path, _text(headers.get(b"authorization")))
            core, model, version = route
            return await core(dataplane_for(state), cycle, headers, model, version, request_id, limit)
        except DetserveError as err:
            return detserve_error_response(err, request_id, path)

    @staticmethod
    async def _predictions(dp, cycle, headers, model, version, request_id, limit):
        async def read_images(max_images: int) -> tuple[list[bytes], bool]:
            torchserve.check_not_text(headers.get(b"content-type", b"").decode("latin-1").lower())
            return [torchserve.check_not_empty(await read_body(cycle, limit))], False

        return await torchserve.predict_call(dp, model, version, cycle.scope["query_string"],
                                             _text(headers.get(b"x-request-timeout-ms")), request_id, read_images)

    async def _v2_infer(self, dp, cycle, headers, model, version, request_id, limit):
        query = cycle.scope["query_string"]
        if version is None and query:
            # The unversioned route's `version` parameter is FastAPI's query parameter: bound the same way.
            version = QueryParams(query).get("version")
        return await self.kserve_v2.infer_call(dp, model, version, _text(headers.get(b"inference-header-content-length")),
                                               lambda: read_body(cycle, limit))


async def read_body(cycle, limit: int | None) -> bytes:
    """The whole body, as uvicorn's receive() and RequestContextMiddleware's count would hand it over."""
    if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
        cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        cycle.waiting_for_100_continue = False
    parts: list[bytes] = []
    seen = 0
    while True:
        if not cycle.disconnected and not cycle.response_complete:
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected or cycle.response_complete:
            raise ClientClosedRequest("the client closed the connection before sending the whole request")
        chunk, more = bytes(cycle.body), cycle.more_body
        cycle.body = bytearray()
        seen += len(chunk)
        check_body_chunk(seen, more, limit, cycle.scope)
        parts.append(chunk)
        if not more:
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def write_response(cycle, response, request_id: str) -> None:
    """`response` (a Starlette Response, never called as ASGI) in one write, with uvicorn's
    bookkeeping of a completed response: keep-alive, close, and starting the next pipelined request."""
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected or cycle.response_started:
        return
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    content = [STATUS_LINE[response.status_code]]
    for name, value in (*cycle.default_headers, *response.raw_headers, (b"x-request-id", request_id.encode())):
        content += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", response.body)
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
