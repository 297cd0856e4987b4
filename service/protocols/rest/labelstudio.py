"""Label Studio ML backend routes: each model is one backend URL, `/labelstudio/{model}`.

Label Studio calls /health, /setup, /predict, /webhook and /versions under that URL; shapes
follow Label Studio 1.23.2 and the 2.x label-studio-ml library. The work is done by
`service.protocols.labelstudio.backend.LabelStudioBackend`.

Auth: Label Studio speaks only HTTP Basic to ML backends, so these routes are exempt from the
server's bearer check and ask for Basic auth instead. When bearer tokens are on and Basic auth is
not configured, they ask for a bearer token like every other route (which Label Studio cannot
send, so the 401 says how to configure Basic auth), unless `labelstudio.allow_unauthenticated`.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from ...engine.dataplane import dataplane_for
from ...errors import DetserveError, InvalidRequest, ModelNotReady, Unauthenticated, http_status
from ...types import Protocol as Door
from ..labelstudio.backend import LabelStudioBackend, basic_auth_credentials

log = logging.getLogger("detserve.labelstudio")

NO_BASIC_AUTH_HINT = (
    "bearer tokens are on (auth.inference_tokens) and Label Studio cannot send them: set "
    "labelstudio.basic_auth_user/basic_auth_pass (or BASIC_AUTH_USER/BASIC_AUTH_PASS) and the same pair "
    "in the Label Studio backend's Basic auth, or set labelstudio.allow_unauthenticated=true to leave "
    "these routes open"
)


def _backend(request: Request) -> LabelStudioBackend:
    backend = getattr(request.app.state, "labelstudio_backend", None)
    if backend is None:
        settings = request.app.state.settings.labelstudio
        backend = request.app.state.labelstudio_backend = LabelStudioBackend(settings)
    return backend


def _bearer_tokens_on(request: Request) -> bool:
    auth = getattr(request.app.state, "auth", None)
    return auth is not None and auth.enabled("inference")


def require_label_studio_auth(request: Request) -> None:
    """HTTP Basic auth when a user is configured (Label Studio's BASIC_AUTH option); otherwise the
    server's bearer tokens when those are on, so no route runs inference or fetches without credentials."""
    settings = request.app.state.settings
    expected = basic_auth_credentials(settings)
    if expected is None:
        if settings.labelstudio.allow_unauthenticated or not _bearer_tokens_on(request):
            return
        try:
            request.app.state.auth.check("inference", request.headers.get("authorization"))
        except Unauthenticated as exc:
            if not getattr(request.app.state, "labelstudio_refusal_logged", False):
                request.app.state.labelstudio_refusal_logged = True  # once: Label Studio retries often
                log.warning("refusing /labelstudio requests without credentials: %s", NO_BASIC_AUTH_HINT)
            raise Unauthenticated(f"{exc.message}; {NO_BASIC_AUTH_HINT}") from None
        return
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    user = password = ""
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            pass
    ok_user = hmac.compare_digest(user.encode(), expected[0].encode())
    ok_pass = hmac.compare_digest(password.encode(), expected[1].encode())
    if not (ok_user and ok_pass):
        raise HTTPException(
            status_code=401,
            detail="Label Studio backend needs HTTP Basic auth: set the backend's Basic auth user and password",
            headers={"WWW-Authenticate": 'Basic realm="detserve label studio"'},
        )


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


router = APIRouter(prefix="/labelstudio/{model}", tags=["labelstudio"], dependencies=[Depends(require_label_studio_auth)])


@router.get("/health")
@router.get("/")
async def health(model: str, request: Request) -> dict:
    return _backend(request).health(_engine(request), model)


@router.post("/setup")
async def setup(model: str, request: Request) -> dict:
    return _backend(request).setup(_engine(request), model, await _json_body(request))


@router.post("/predict")
async def predict(model: str, request: Request) -> dict:
    started = time.perf_counter()
    code = 500
    try:
        body = await _json_body(request)
        result = await _backend(request).predict(_engine(request), request.app.state.settings, model, body)
        code = 200
        return result
    except DetserveError as err:
        code = http_status(err)
        raise
    finally:
        dataplane_for(request.app.state).record(model, Door.LABELSTUDIO.value, code, time.perf_counter() - started)


def _engine(request: Request):
    """The engine, once the data plane (the one readiness source) says the server is neither
    starting nor draining; per-model readiness (live workers) is checked by the backend."""
    dp = dataplane_for(request.app.state)
    if dp.starting or dp.draining or not dp.live():
        raise ModelNotReady("the server is starting or stopping; retry shortly")
    return dp.engine


@router.post("/webhook")
async def webhook(model: str, request: Request) -> JSONResponse:
    _engine(request).model_info(model)  # 404 for an unknown model
    status, body = LabelStudioBackend.webhook(await _json_body(request))
    return JSONResponse(body, status_code=status)


@router.get("/versions")
@router.post("/versions")  # label-studio-ml 1.0.9 served POST
async def versions(model: str, request: Request) -> dict:
    return _backend(request).versions(_engine(request), model)


@router.get("/metrics")
async def metrics(model: str) -> dict:
    return {}
