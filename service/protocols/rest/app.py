"""FastAPI apps for the three HTTP ports, and the one place HTTP errors are rendered.

Inference (8080): TorchServe routes, health, and the KServe V2 / Label Studio routers when those
modules exist. Management (8081) and metrics (8082) are separate apps so each port can be bound
and protected on its own. Every response carries `X-Request-ID`; every error body is
`{"code","message","request_id"}` with the status from `service.errors.http_status`; under `/v2/` it
also carries the Open Inference Protocol's `"error"` field, so V2 clients read errors raised before
the KServe router runs (body limit, auth, a last-resort 500) the same way as the router's own.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import time

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine.api import EngineAPI
from ...engine.dataplane import DataPlane
from ...errors import ClientClosedRequest, DetserveError, InvalidRequest, ModelNotReady, Overloaded, PayloadTooLarge, Unauthenticated, http_status
from ...observability import metrics
from ...observability.logging import clean_request_id, log_access, request_id_var
from ...settings import ServerSettings
from . import torchserve

log = logging.getLogger("detserve.rest")

OPTIONAL_ROUTERS = ("service.protocols.rest.kserve_v2", "service.protocols.rest.labelstudio")
# Open unless settings.auth.protect_health: orchestrators probe these without credentials.
HEALTH_PATHS = frozenset({"/ping", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
# The scope key under which rest/limits.py leaves an error for the next body receive() to raise.
CUT_KEY = "detserve.cut"
# Label Studio only speaks HTTP Basic to ML backends (no bearer option), so its router checks its
# own credentials and bearer tokens are not asked of it.
BEARER_EXEMPT_MODULES = frozenset({"service.protocols.rest.labelstudio"})


# ---- errors: the one table ---------------------------------------------------------------------

def error_response(status: int, code: str, message: str, request_id: str | None, headers: dict | None = None,
                   path: str = "") -> Response:
    body = {"code": code, "message": message, "request_id": request_id or ""}
    if path.startswith("/v2/"):
        body["error"] = message
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def detserve_error_response(err: DetserveError, request_id: str | None, path: str = "") -> Response:
    headers = {}
    if isinstance(err, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s or 1)))
    if isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(http_status(err), err.code, err.message, request_id, headers, path)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _on_detserve_error(request: Request, exc: DetserveError) -> Response:
    return detserve_error_response(exc, _request_id(request), request.url.path)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "header", "path"))
        parts.append(f"{loc or 'request'}: {e.get('msg')}")
    return detserve_error_response(InvalidRequest("; ".join(parts) or "invalid request"), _request_id(request),
                                   request.url.path)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_request", 413: "payload_too_large"}


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), _request_id(request), exc.headers,
                          request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DetserveError, _on_detserve_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    # Anything else is caught by RequestContextMiddleware, which renders a 500 in the same shape.


# ---- per-request context: id, body limit, access log, last-resort 500 ---------------------------

def first_values(raw_headers) -> dict[bytes, bytes]:
    """Header name -> its first value, as Starlette's `Headers.get` reads a repeated header."""
    headers: dict[bytes, bytes] = {}
    for name, value in raw_headers:
        if name not in headers:
            headers[name] = value
    return headers


def declared_too_large(headers: dict[bytes, bytes], max_body_bytes: int | None) -> PayloadTooLarge | None:
    """The 413 of a Content-Length over the limit, answered before a byte of the body is read."""
    if max_body_bytes is None:
        return None
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        return PayloadTooLarge(f"request body of {int(declared)} bytes exceeds max_request_size ({max_body_bytes} bytes)")
    return None


def check_body_chunk(seen: int, more_body: bool, limit: int | None, scope) -> None:
    """After each body chunk (`seen` bytes so far): the streamed limit, and a cut by rest/limits.py."""
    if limit is not None and seen > limit:  # chunked uploads declare no length: stop them mid-stream
        raise PayloadTooLarge(f"request body exceeds max_request_size ({limit} bytes)")
    # A body timeout or the end of a drain (rest/limits.py) marks the scope and wakes the reader.
    if more_body and CUT_KEY in scope:
        raise scope[CUT_KEY]


def shutdown_response(request_id: str, path: str) -> Response:
    """What a request still running when the drain timeout ends gets, instead of uvicorn's plain 500."""
    return error_response(503, ModelNotReady.code, "the server shut down before this request finished", request_id,
                          path=path)


def internal_error_response(request_id: str, path: str) -> Response:
    return error_response(500, "internal", "internal server error", request_id, path=path)


def log_request(scope, status: int, started: float, request_id: str) -> None:
    """The access line of one request; `status` 0 when no answer was sent."""
    client = scope.get("client")
    path = scope.get("path", "")
    log_access(scope.get("method", ""), path, status or 500, time.perf_counter() - started, request_id,
               f"{client[0]}:{client[1]}" if client else None, quiet=path in HEALTH_PATHS or path == "/metrics")


class RequestContextMiddleware:
    """Pure ASGI so the body limit applies to the stream, before anything buffers it."""

    def __init__(self, app, max_body_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = first_values(scope.get("headers") or ())
        request_id = clean_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": 0, "sent": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            too_large = declared_too_large(headers, self.max_body_bytes)
            if too_large is not None:
                return await detserve_error_response(too_large, request_id, scope.get("path", ""))(
                    scope, receive, send_with_id)
            await self.app(scope, self._counting(receive, scope), send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the drain timeout ends; its own answer
            # would be a plain-text 500, so answer in the error table's shape first.
            if not status["sent"]:
                with contextlib.suppress(Exception):
                    await shutdown_response(request_id, scope.get("path", ""))(scope, receive, send_with_id)
            raise
        except Exception:  # noqa: BLE001 - the last resort: should never happen, so log it loudly
            log.exception("unhandled error serving %s %s", scope.get("method"), scope.get("path"))
            if not status["sent"]:
                await internal_error_response(request_id, scope.get("path", ""))(scope, receive, send_with_id)
        finally:
            log_request(scope, status["code"], started, request_id)
            request_id_var.reset(token)

    def _counting(self, receive, scope):
        if self.max_body_bytes is None:
            return receive
        limit, seen, complete = self.max_body_bytes, 0, False

        async def counted():
            nonlocal seen, complete
            message = await receive()
            if message["type"] == "http.disconnect":
                if not complete:  # after the whole body, a disconnect is the app's business
                    raise ClientClosedRequest("the client closed the connection before sending the whole request")
                return message
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                seen += len(message.get("body", b""))
                check_body_chunk(seen, message.get("more_body", False), limit, scope)
            return message

        return counted


# ---- auth --------------------------------------------------------------------------------------

def _build_auth(settings: ServerSettings):
    try:
        auth_module = importlib.import_module("service.protocols.auth")
    except ModuleNotFoundError as exc:
        if exc.name != "service.protocols.auth":
            raise
        return None
    auth = auth_module.TokenAuth.from_settings(settings.auth)
    return auth if (auth.enabled("inference") or auth.enabled("management")) else None


def check_auth(request: Request, api: str) -> None:
    """The token check of an app built here: the dependency of every route, and the fast door's."""
    check_token(request.app.state, api, request.url.path, request.headers.get("authorization"))


def check_token(state, api: str, path: str, authorization: str | None) -> None:
    """`state`: an app's state. The one rule of which paths are open and which need a token."""
    auth = state.auth
    if auth is None or path in state.open_paths or path.startswith(state.open_prefixes):
        return
    auth.check(api, authorization)


def _auth_dependency(api: str):
    async def check(request: Request) -> None:
        check_auth(request, api)

    return check


# ---- the fast door -----------------------------------------------------------------------------

class InferenceApp(FastAPI):
    """The inference app, answering /predictions in front of FastAPI's stack.

    With the null model, FastAPI's layers above the route (ServerErrorMiddleware, the exception
    middleware, two routers with their route matching, the exit stack, the endpoint wrapper) were a
    quarter of the front process's time (py-spy at c16). The fast door matches the two /predictions
    routes with one string test and runs the same RequestContextMiddleware (request id, body limit,
    access log, last-resort 500), the same token check, the same `torchserve.predict` and the same
    error table as the routes do. Every other request, and every request when middleware beyond
    RequestContextMiddleware is installed (CORS) or a root path is set, goes through FastAPI."""

    fast_door_enabled = True  # False sends /predictions through FastAPI's routes (parity tests)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_door = None  # RequestContextMiddleware around _fast_predict, built on first use

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope.get("root_path"):
            route = torchserve.match_predictions(scope["method"], scope["path"])
            if route is not None and self.fast_door_ready():
                scope["app"] = self
                scope["detserve.route"] = route
                return await self._fast_door(scope, receive, send)
        await super().__call__(scope, receive, send)

    def fast_door_ready(self) -> bool:
        """Whether /predictions may skip FastAPI's stack (the ASGI fast door and rest/direct.py)."""
        return self.fast_door_enabled and (self._fast_door is not None or self._build_fast_door() is not None)

    def _build_fast_door(self):
        # Decided once the app is complete: middleware that only the FastAPI stack runs rules it out.
        if [m.cls for m in self.user_middleware] != [RequestContextMiddleware] or self.root_path:
            self.fast_door_enabled = False
            return None
        self._fast_door = RequestContextMiddleware(self._fast_predict, **self.user_middleware[0].kwargs)
        return self._fast_door

    async def _fast_predict(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        model, version = scope["detserve.route"]
        try:
            if self.state.auth is not None:
                check_auth(request, "inference")
            response = await torchserve.predict(request, model, version)
        except DetserveError as err:  # what _on_detserve_error renders on the FastAPI routes
            response = detserve_error_response(err, _request_id(request), scope["path"])
        await response(scope, receive, send)


# ---- app builders ------------------------------------------------------------------------------

def _base_app(title: str, api: str | None, settings: ServerSettings, auth, open_paths: set[str],
              app_cls: type[FastAPI] = FastAPI) -> FastAPI:
    # No dependency at all when auth is off: FastAPI's dependency solving costs every request.
    dependencies = [Depends(_auth_dependency(api))] if api and auth is not None else []
    app = app_cls(title=title, docs_url=None, redoc_url=None, openapi_url=None, dependencies=dependencies)
    app.state.settings = settings
    app.state.auth = auth
    app.state.open_paths = open_paths
    app.state.open_prefixes = ()
    install_error_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_request_size)
    return app


def _optional_router(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None
    return module.router


def build_inference_app(engine: EngineAPI, settings: ServerSettings, dataplane: DataPlane | None = None) -> FastAPI:
    """`dataplane` is shared with the gRPC server by run_server; its starting/draining flags are the
    readiness every door reports."""
    open_paths: set[str] = set() if settings.auth.protect_health else set(HEALTH_PATHS)
    app = _base_app("detserve inference", "inference", settings, _build_auth(settings), open_paths, InferenceApp)
    app.state.engine = engine
    app.state.dataplane = dataplane or DataPlane(engine, max_images_per_request=settings.max_images_per_request)
    app.include_router(torchserve.router)
    for module_name in OPTIONAL_ROUTERS:
        router = _optional_router(module_name)
        if router is None:
            continue
        app.include_router(router)
        if module_name in BEARER_EXEMPT_MODULES:  # static part of each route, e.g. "/labelstudio/"
            prefixes = {route.path.split("{")[0] for route in router.routes if hasattr(route, "path")}
            app.state.open_prefixes += tuple(sorted(p for p in prefixes if len(p) > 1))
        log.debug("included router %s", module_name)
    return app


def build_management_app(engine: EngineAPI, settings: ServerSettings) -> FastAPI:
    from . import management

    app = _base_app("detserve management", "management", settings, _build_auth(settings), set())
    app.state.engine = engine
    app.include_router(management.router)
    return app


def build_metrics_app(settings: ServerSettings | None = None) -> FastAPI:
    """Prometheus text on GET /metrics; management tokens guard it when auth.protect_metrics is set."""
    settings = settings or ServerSettings()
    auth = _build_auth(settings) if settings.auth.protect_metrics else None
    app = _base_app("detserve metrics", "management", settings, auth, set())

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render_latest()
        return Response(body, media_type=content_type)

    return app
