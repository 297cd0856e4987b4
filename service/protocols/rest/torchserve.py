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
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...engine.dataplane import OPTION_NAMES, DataPlane, dataplane_for, decimal
from ...errors import DetserveError, InvalidImage, InvalidRequest, PayloadTooLarge, UnsupportedMediaType, http_status
from ...types import DetectResult, EncodedImage, RenderFormat
from ...types import Protocol as Door
from ..render import torchserve_result

router = APIRouter()

FORM_FIELDS = ("data", "body")  # the MMDetection handler reads row.get('data') or row.get('body')
_TEXT_TYPES = ("text/", "application/json")


def _json(payload, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


# ---- health ------------------------------------------------------------------------------------

def _dp(request: Request) -> DataPlane:
    return dataplane_for(request.app.state)


@router.get("/ping")
async def ping(request: Request) -> Response:
    """TorchServe's answer: 200 Healthy, or 500 Unhealthy while a model lacks a live worker."""
    if _dp(request).ready():
        return _json({"status": "Healthy"})
    return _json({"status": "Unhealthy"}, 500)


@router.get("/healthz")
async def healthz(request: Request) -> Response:
    """Liveness: the process serves and the engine is up (or still loading its models)."""
    dp = _dp(request)
    if dp.starting:
        return _json({"status": "starting"})
    if dp.live():
        return _json({"status": "alive"})
    return _json({"status": "dead"}, 503)


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Readiness: every configured model has a live worker, and the server is not starting or draining."""
    dp = _dp(request)
    state = dp.state()
    models = {info.name: info.ready for info in dp.engine.models()} if state not in ("starting", "dead") else {}
    return _json({"status": state, "models": models}, 200 if state == "ready" else 503)


# ---- predictions -------------------------------------------------------------------------------
# Options arrive as plain strings and are checked by the data plane, with the same bounds and
# messages as every other door.

# The FastAPI routes are the reference; the inference app's fast door (app.py) answers the same
# requests without FastAPI's stack and calls the same `predict`, so both stay one code path.
PREDICTION_METHODS = ("PUT", "POST")
PREDICTIONS_PREFIX = "/predictions/"


@router.api_route("/predictions/{model}", methods=list(PREDICTION_METHODS))
async def predictions(request: Request, model: str) -> Response:
    return await predict(request, model, None)


@router.api_route("/predictions/{model}/{version}", methods=list(PREDICTION_METHODS))
async def predictions_version(request: Request, model: str, version: str) -> Response:
    return await predict(request, model, version)


def match_predictions(method: str, path: str) -> tuple[str, str | None] | None:
    """(model, version) when `method path` is what the two routes above match (Starlette's
    `{param}` is one non-empty segment), else None. Anything else, including a trailing slash,
    is left to FastAPI's router, which redirects, 404s or 405s it."""
    if method not in PREDICTION_METHODS or not path.startswith(PREDICTIONS_PREFIX):
        return None
    model, slash, version = path[len(PREDICTIONS_PREFIX):].partition("/")
    if not model or "/" in version or (slash and not version):
        return None
    return model, version or None


@dataclass(frozen=True, slots=True)
class _Query:
    """The query parameters of /predictions (unknown ones are ignored, as TorchServe does).
    Options stay the client's strings: the data plane checks them, as it does for every door."""

    score_thr: str | None = None
    max_dets: str | None = None
    classes: str | None = None
    render: RenderFormat | None = None
    iou_thr: str | None = None
    class_agnostic: str | None = None
    box_format: str | None = None
    normalized: str | None = None
    mask_format: str | None = None
    tile: str | None = None
    tile_overlap: str | None = None
    tile_merge: str | None = None

    def option_values(self) -> dict[str, str | None]:
        """The data plane's options by name (engine/dataplane.py OPTION_NAMES)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}


_NO_QUERY = _Query()
_FORMATS = ("json", "image")
_IMAGE_FORMATS = {"jpeg": RenderFormat.JPEG, "jpg": RenderFormat.JPEG, "png": RenderFormat.PNG}


def _parse_query(raw: bytes) -> _Query:
    """Parsed by hand rather than as FastAPI `Query` parameters: their per-parameter dependency
    solving was ~6% of the front process's CPU with the null model (py-spy), even with no query."""
    if not raw:
        return _NO_QUERY
    params = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    fmt = params.get("format", "json")
    if fmt not in _FORMATS:
        raise InvalidRequest(f"format: must be one of {list(_FORMATS)}, got {fmt[:40]!r}")
    image_format = params.get("image_format", "jpeg")
    if image_format not in _IMAGE_FORMATS:
        raise InvalidRequest(f"image_format: must be one of {list(_IMAGE_FORMATS)}, got {image_format[:40]!r}")
    render = _IMAGE_FORMATS[image_format] if fmt == "image" else None
    return _Query(render=render, **{name: params.get(name) for name in OPTION_NAMES})


async def predict(request: Request, model: str, version: str | None) -> Response:
    """/predictions from a Starlette request: the FastAPI routes and the ASGI fast door (app.py)."""
    return await predict_call(_dp(request), model, version, request.scope["query_string"],
                              request.headers.get("x-request-timeout-ms"), request.state.request_id,
                              lambda max_images: _read_images(request, max_images))


async def predict_call(dp: DataPlane, model: str, version: str | None, query_string: bytes,
                       timeout_header: str | None, request_id: str, read_images) -> Response:
    """/predictions end to end, the one core of every way a request reaches it (the FastAPI routes,
    the ASGI fast door, the direct door of rest/direct.py). `read_images(max_images)` returns the
    image payload(s) and whether the client sent several. DetserveErrors propagate (after being
    counted) for the caller's error table to render."""
    started = time.perf_counter()
    code: int = 500
    try:
        query = _parse_query(query_string)
        info = dp.resolve(model, version)  # 503 while starting, 404 before reading a large body
        options = dp.options(info, render=query.render, **query.option_values())
        images, many = await read_images(dp.max_images_per_request)
        if options.render is not None and many:
            raise InvalidRequest("format=image takes exactly one image per request")
        results = await dp.detect(
            model, [EncodedImage(data) for data in images], options,
            protocol=Door.REST, request_id=request_id, timeout_s=timeout_seconds(timeout_header),
        )
        if options.render is not None:
            response = _rendered(results[0], options.render)
        elif many:
            response = _json([torchserve_result(r, options) for r in results])
        else:
            response = _json(torchserve_result(results[0], options))
        code = response.status_code
        return response
    except DetserveError as err:
        code = http_status(err)
        raise
    finally:
        dp.record(model, Door.REST.value, code, time.perf_counter() - started)


def timeout_seconds(raw: str | None) -> float | None:
    """The X-Request-Timeout-Ms header in seconds (None when absent)."""
    if raw is None:
        return None
    ms = decimal(raw)
    if ms is None or not 0 < ms < float("inf"):
        raise InvalidRequest(f"X-Request-Timeout-Ms must be a positive number of milliseconds, got {raw!r}")
    return ms / 1000.0


def check_not_text(content_type: str) -> None:
    """A text or JSON body is a client mistake, not an image to decode (every reader of a raw body)."""
    if content_type.startswith(_TEXT_TYPES):
        raise UnsupportedMediaType(
            f"Content-Type {content_type.split(';')[0]!r} is not an image: send the image bytes "
            "(curl -T img.jpg) or a multipart field 'data'"
        )


def check_not_empty(body: bytes) -> bytes:
    if not body:
        raise InvalidImage("empty request body: send an image (curl -T img.jpg URL)")
    return body


async def _read_images(request: Request, max_images: int) -> tuple[list[bytes], bool]:
    """The image payload(s) and whether the client sent several (which changes the response shape)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, max_images)
    check_not_text(content_type)
    return [check_not_empty(await request.body())], False


async def _read_multipart(request: Request, max_images: int) -> tuple[list[bytes], bool]:
    max_bytes = request.app.state.settings.max_request_size
    try:
        # One more than allowed, so that too many parts reads as "too many images", not a parse error.
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 1, max_part_size=max_bytes)
    except StarletteHTTPException as exc:  # starlette's MultiPartException: malformed or over the limits
        raise InvalidRequest(f"multipart body: {exc.detail}") from None
    try:
        for name in FORM_FIELDS:
            values = form.getlist(name)
            if values:
                break
        else:  # no 'data'/'body': take every uploaded file, in order
            values = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not values:
            raise InvalidImage("multipart body has no image: send the file as field 'data' (-F data=@img.jpg)")
        if len(values) > max_images:
            raise PayloadTooLarge(f"more than max_images_per_request ({max_images}) images in one request")
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
