"""TorchServe-compatible inference routes: /predictions, /ping, /healthz, /readyz.

Drop-in for clients of the MMDetection TorchServe handler: a raw body (`curl -T img.jpg`) or
multipart field `data` (falling back to `body`, or several files) in, the handler's JSON list out.
The adapter parses, calls the engine and renders; decoding, batching and formatting live elsewhere.
"""
from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from ...engine.api import EngineAPI
from ...errors import (
    DetserveError,
    InvalidImage,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    UnsupportedMediaType,
    http_status,
)
from ...observability import metrics
from ...types import DetectOptions, DetectResult, EncodedImage, RenderFormat
from ...types import Protocol as Door

router = APIRouter()

FORM_FIELDS = ("data", "body")  # the MMDetection handler reads row.get('data') or row.get('body')
MAX_FILES_PER_REQUEST = 64
_TEXT_TYPES = ("text/", "application/json")


def _json(payload, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


# ---- health ------------------------------------------------------------------------------------

@router.get("/ping")
async def ping(request: Request) -> Response:
    """TorchServe's answer: 200 Healthy, or 500 Unhealthy while a model lacks a live worker."""
    if _ready(request):
        return _json({"status": "Healthy"})
    return _json({"status": "Unhealthy"}, 500)


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    """Liveness: the process serves and the engine is up (or still loading its models)."""
    engine: EngineAPI = request.app.state.engine
    if request.app.state.starting:
        return _json({"status": "starting"})
    if engine.live():
        return _json({"status": "alive"})
    return _json({"status": "dead"}, 503)


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Readiness: every configured model has a live worker, and the server is not draining."""
    state = request.app.state
    if state.starting:
        return _json({"status": "starting", "models": {}}, 503)
    engine: EngineAPI = state.engine
    models = {info.name: info.ready for info in engine.models()} if engine.live() else {}
    if state.draining:
        return _json({"status": "draining", "models": models}, 503)
    if _ready(request):
        return _json({"status": "ready", "models": models})
    return _json({"status": "not ready", "models": models}, 503)


def _ready(request: Request) -> bool:
    state = request.app.state
    return not (state.starting or state.draining) and state.engine.live() and state.engine.ready()


# ---- predictions -------------------------------------------------------------------------------

@router.api_route("/predictions/{model}", methods=["PUT", "POST"])
async def predictions(request: Request, model: str) -> Response:
    return await _predict(request, model, None)


@router.api_route("/predictions/{model}/{version}", methods=["PUT", "POST"])
async def predictions_version(request: Request, model: str, version: str) -> Response:
    return await _predict(request, model, version)


@dataclass(frozen=True, slots=True)
class _Query:
    """The query parameters of /predictions (unknown ones are ignored, as TorchServe does)."""

    score_thr: float | None = None
    max_dets: int | None = None
    classes: str | None = None
    render: RenderFormat | None = None


_NO_QUERY = _Query()
_FORMATS = ("json", "image")
_IMAGE_FORMATS = {"jpeg": RenderFormat.JPEG, "jpg": RenderFormat.JPEG, "png": RenderFormat.PNG}


def _parse_query(raw: bytes) -> _Query:
    """Parsed by hand rather than as FastAPI `Query` parameters: their per-parameter dependency
    solving was ~6% of the front process's CPU with the null model (py-spy), even with no query."""
    if not raw:
        return _NO_QUERY
    params = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    score_thr = _number(params, "score_thr", float, 0.0, 1.0)
    max_dets = _number(params, "max_dets", int, 1, 10_000)
    fmt = params.get("format", "json")
    if fmt not in _FORMATS:
        raise InvalidRequest(f"format: must be one of {list(_FORMATS)}, got {fmt!r}")
    image_format = params.get("image_format", "jpeg")
    if image_format not in _IMAGE_FORMATS:
        raise InvalidRequest(f"image_format: must be one of {list(_IMAGE_FORMATS)}, got {image_format!r}")
    render = _IMAGE_FORMATS[image_format] if fmt == "image" else None
    return _Query(score_thr, max_dets, params.get("classes"), render)


def _number(params: dict, name: str, kind: type, low: float, high: float):
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise InvalidRequest(f"{name}: must be {'an integer' if kind is int else 'a number'} "
                             f"between {low:g} and {high:g}, got {raw!r}")
    return value


async def _predict(request: Request, model: str, version: str | None) -> Response:
    started = time.perf_counter()
    code: int = 500
    try:
        response = await _predict_inner(request, model, version)
        code = response.status_code
        return response
    except DetserveError as err:
        code = http_status(err)
        raise
    finally:
        metrics.record_request(model, Door.REST.value, code, time.perf_counter() - started)


async def _predict_inner(request: Request, model: str, version: str | None) -> Response:
    engine: EngineAPI = request.app.state.engine
    query = _parse_query(request.scope["query_string"])
    if request.app.state.starting or not engine.live():
        raise ModelNotReady("the server is starting or stopping; retry shortly")
    info = engine.model_info(model)  # ModelNotFound -> 404 before reading a large body
    if version is not None and version != info.version:
        raise ModelNotFound(f"model {model!r} has no version {version!r}; the loaded version is {info.version!r}")
    options = DetectOptions(
        score_thr=query.score_thr,
        max_dets=query.max_dets,
        classes=_parse_classes(query.classes, info.classes),
        render=query.render,
    )
    images, many = await _read_images(request)
    if options.render is not None and many:
        raise InvalidRequest("format=image takes exactly one image per request")
    results = await engine.detect(
        model, [EncodedImage(data) for data in images], options,
        protocol=Door.REST, request_id=request.state.request_id, timeout_s=_timeout_s(request),
    )
    if options.render is not None:
        return _rendered(results[0], options.render)
    if many:
        return _json([r.to_torchserve() for r in results])
    return _json(results[0].to_torchserve())


def _parse_classes(raw: str | None, known: tuple[str, ...]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise InvalidRequest("classes: give one or more comma-separated class names")
    unknown = [n for n in names if known and n not in known]
    if unknown:
        raise InvalidRequest(f"classes: unknown class name(s) {unknown}; this model knows {list(known)}")
    return names


def _timeout_s(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not ms > 0 or ms == float("inf"):
        raise InvalidRequest(f"X-Request-Timeout-Ms must be a positive number of milliseconds, got {raw!r}")
    return ms / 1000.0


async def _read_images(request: Request) -> tuple[list[bytes], bool]:
    """The image payload(s) and whether the client sent several (which changes the response shape)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request)
    if content_type.startswith(_TEXT_TYPES):
        raise UnsupportedMediaType(
            f"Content-Type {content_type.split(';')[0]!r} is not an image: send the image bytes "
            "(curl -T img.jpg) or a multipart field 'data'"
        )
    body = await request.body()
    if not body:
        raise InvalidImage("empty request body: send an image (curl -T img.jpg URL)")
    return [body], False


async def _read_multipart(request: Request) -> tuple[list[bytes], bool]:
    max_bytes = request.app.state.settings.max_request_size
    form = await request.form(max_files=MAX_FILES_PER_REQUEST, max_fields=MAX_FILES_PER_REQUEST, max_part_size=max_bytes)
    try:
        for name in FORM_FIELDS:
            values = form.getlist(name)
            if values:
                break
        else:  # no 'data'/'body': take every uploaded file, in order
            values = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not values:
            raise InvalidImage("multipart body has no image: send the file as field 'data' (-F data=@img.jpg)")
        images = [await _part_bytes(v) for v in values]
    finally:
        await form.close()
    for i, data in enumerate(images):
        if not data:
            raise InvalidImage(f"multipart image {i} is empty")
    return images, len(images) > 1


async def _part_bytes(value) -> bytes:
    if isinstance(value, UploadFile):
        return await value.read()
    # A text field: the MMDetection handler base64-decodes strings, so clients may send that.
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("multipart text field is not base64: send the image as a file (-F data=@img.jpg)") from None


def _rendered(result: DetectResult, fmt: RenderFormat) -> Response:
    if not result.rendered:
        raise InvalidRequest("this model returned no rendered image")
    return Response(result.rendered, media_type="image/png" if fmt is RenderFormat.PNG else "image/jpeg")
