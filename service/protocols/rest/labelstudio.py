"""Label Studio ML backend routes: each model is one backend URL, `/labelstudio/{model}`.

Label Studio calls /health, /setup, /predict, /webhook and /versions under that URL; shapes
follow Label Studio 1.23.2 and the 2.x label-studio-ml library. The work is done by
`service.protocols.labelstudio.backend.LabelStudioBackend`.
"""
from __future__ import annotations

import base64
import binascii
import hmac

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from ...errors import InvalidRequest
from ..labelstudio.backend import LabelStudioBackend, basic_auth_credentials


def _backend(request: Request) -> LabelStudioBackend:
    backend = getattr(request.app.state, "labelstudio_backend", None)
    if backend is None:
        backend = request.app.state.labelstudio_backend = LabelStudioBackend()
    return backend


def require_basic_auth(request: Request) -> None:
    """HTTP Basic auth, on only when a user is configured (Label Studio's BASIC_AUTH option)."""
    expected = basic_auth_credentials(request.app.state.settings)
    if expected is None:
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


router = APIRouter(prefix="/labelstudio/{model}", tags=["labelstudio"], dependencies=[Depends(require_basic_auth)])


@router.get("/health")
@router.get("/")
async def health(model: str, request: Request) -> dict:
    return _backend(request).health(request.app.state.engine, model)


@router.post("/setup")
async def setup(model: str, request: Request) -> dict:
    return _backend(request).setup(request.app.state.engine, model, await _json_body(request))


@router.post("/predict")
async def predict(model: str, request: Request) -> dict:
    body = await _json_body(request)
    return await _backend(request).predict(request.app.state.engine, request.app.state.settings, model, body)


@router.post("/webhook")
async def webhook(model: str, request: Request) -> JSONResponse:
    request.app.state.engine.model_info(model)  # 404 for an unknown model
    status, body = LabelStudioBackend.webhook(await _json_body(request))
    return JSONResponse(body, status_code=status)


@router.get("/versions")
@router.post("/versions")  # label-studio-ml 1.0.9 served POST
async def versions(model: str, request: Request) -> dict:
    return _backend(request).versions(request.app.state.engine, model)


@router.get("/metrics")
async def metrics(model: str) -> dict:
    return {}
