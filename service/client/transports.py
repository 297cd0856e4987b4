"""The two wire transports behind the client: REST (httpx) and gRPC (grpc.aio). Both speak in
service.types and raise service.errors, so the client above them is protocol-neutral."""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from .. import errors
from ..protocols.grpc import convert
from ..protocols.grpc.generated import detserve_pb2 as pb
from ..protocols.grpc.generated import detserve_pb2_grpc
from ..types import BatchSettings, DetectOptions, DetectResult, Detection, ImageInput, ModelInfo, RawImage, RLEMask

_BY_CODE = {}


def _collect(cls) -> None:
    for sub in cls.__subclasses__():
        _BY_CODE.setdefault(sub.code, sub)
        _collect(sub)


_collect(errors.DetserveError)

# gRPC status -> the error raised client-side when the server sent no finer detail.
_BY_GRPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest, grpc.StatusCode.NOT_FOUND: errors.ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded, grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: errors.ModelNotReady, grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


@dataclass(frozen=True, slots=True)
class CallOptions:
    timeout_s: float
    token: str | None


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# --- REST -------------------------------------------------------------------------------------

class RestTransport:
    """Detection over the TorchServe-compatible inference API (multipart `data` parts for a
    batch); models over the management API, by default at the inference port + 1 (8080 -> 8081)."""

    retryable_statuses = (429, 503)

    def __init__(self, url: str, management_url: str | None = None):
        self.url = url.rstrip("/")
        self.management_url = (management_url or _next_port(self.url)).rstrip("/")
        self._http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=32))

    async def close(self) -> None:
        await self._http.aclose()

    def _headers(self, call: CallOptions) -> dict[str, str]:
        headers = {"X-Request-Timeout-Ms": str(int(call.timeout_s * 1000))}
        if call.token:
            headers["Authorization"] = f"Bearer {call.token}"
        return headers

    async def _request(self, method: str, url: str, call: CallOptions, **kwargs) -> httpx.Response:
        try:
            response = await self._http.request(method, url, headers=self._headers(call), timeout=call.timeout_s, **kwargs)
        except httpx.TimeoutException as exc:
            raise errors.DeadlineExceeded(f"no answer from {url} within {call.timeout_s:g} s") from exc
        except httpx.TransportError as exc:
            raise errors.ModelNotReady(f"cannot reach {url}: {exc}") from exc  # UNAVAILABLE: retryable
        if response.status_code >= 400:
            raise _rest_error(response)
        return response

    async def detect(self, model: str, images: Sequence[ImageInput], options: DetectOptions,
                     call: CallOptions) -> list[DetectResult]:
        if any(isinstance(image, RawImage) for image in images):
            raise errors.InvalidRequest("the REST client sends encoded images only; use gRPC for raw pixels")
        params = query_params(options)
        url = f"{self.url}/predictions/{model}"
        if len(images) == 1:
            response = await self._request("POST", url, call, params=params, content=images[0].data)
            per_image = [response.json()]
        else:
            files = [("data", (f"image{i}", image.data, "application/octet-stream")) for i, image in enumerate(images)]
            response = await self._request("POST", url, call, params=params, files=files)
            per_image = response.json()
        # The TorchServe JSON has no image size; the image's own header gives it (for normalized boxes).
        return [DetectResult([_detection_from_json(d) for d in dets], *_encoded_size(image.data), model_name=model)
                for dets, image in zip(per_image, images)]

    async def list_models(self, call: CallOptions) -> list[ModelInfo]:
        names = [m["modelName"] for m in (await self._request("GET", f"{self.management_url}/models", call)).json()["models"]]
        return [await self.model_info(name, call) for name in names]

    async def model_info(self, model: str, call: CallOptions) -> ModelInfo:
        described = (await self._request("GET", f"{self.management_url}/models/{model}", call)).json()[0]
        return _model_from_describe(described)

    async def health(self, call: CallOptions) -> bool:
        try:
            await self._request("GET", f"{self.url}/readyz", call)
        except errors.DetserveError:
            return False
        return True


# Sent as query parameters when set; box_format / normalized are not: the client returns xyxy pixels.
QUERY_OPTIONS = ("score_thr", "max_dets", "iou_thr", "class_agnostic", "mask_format", "tile", "tile_overlap",
                  "tile_merge")


def query_params(options: DetectOptions) -> dict[str, str | int | float]:
    params: dict[str, str | int | float] = {}
    for name in QUERY_OPTIONS:
        value = getattr(options, name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        params[name] = getattr(value, "value", value)
    if options.classes:
        params["classes"] = ",".join(options.classes)
    return params


def _encoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the server sees the image: EXIF orientation 5-8 swaps them. (0, 0) if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the server decoded it; a size we cannot read is just unknown
        return 0, 0
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _next_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port + 1}"))


def _rest_error(response: httpx.Response) -> errors.DetserveError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    message = body.get("message") or body.get("error") or f"HTTP {response.status_code}"
    cls = _BY_CODE.get(body.get("code", ""))
    if cls is None:
        cls = {400: errors.InvalidRequest, 401: errors.Unauthenticated, 403: errors.PermissionDenied,
               404: errors.ModelNotFound, 413: errors.PayloadTooLarge, 415: errors.UnsupportedMediaType,
               429: errors.Overloaded, 503: errors.ModelNotReady, 504: errors.DeadlineExceeded}.get(
                   response.status_code, errors.InternalError)
    return cls(message, retry_after_s=_retry_after(response.headers.get("retry-after")))


def _detection_from_json(d: dict) -> Detection:
    seg = d.get("segmentation")
    mask = RLEMask(seg["size"][0], seg["size"][1], seg["counts"]) if seg else None
    polygons = tuple(tuple(float(v) for v in p) for p in d["polygons"]) if "polygons" in d else None
    return Detection(int(d["class_label"]), d["class_name"], float(d["score"]), tuple(float(v) for v in d["bbox"]), mask,
                     polygons)


def _model_from_describe(d: dict) -> ModelInfo:
    return ModelInfo(
        name=d["modelName"], version=d["modelVersion"], arch=d.get("arch", ""), backend=d.get("backend", ""),
        classes=tuple(d.get("classes", ())), input_size=int(d.get("inputSize", 0)), has_masks=bool(d.get("hasMasks")),
        ready=bool(d.get("ready")),
        batch=BatchSettings(d.get("batchSize", 8), d.get("maxBatchDelay", 0.0), d.get("maxQueueSize", 256),
                            d.get("requestTimeoutMs", 30_000.0)),
        default_score_thr=float(d.get("defaultScoreThr", 0.3)),
    )


# --- gRPC -------------------------------------------------------------------------------------

class GrpcTransport:
    """detserve.v1.Detector over one channel (HTTP/2 multiplexes all calls on it)."""

    def __init__(self, target: str, max_message_bytes: int = 64 * 1024 * 1024):
        self.target = target
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self._stub = detserve_pb2_grpc.DetectorStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request, call: CallOptions):
        metadata = (("authorization", f"Bearer {call.token}"),) if call.token else None
        try:
            return await method(request, timeout=call.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _grpc_error(exc) from None

    async def detect(self, model: str, images: Sequence[ImageInput], options: DetectOptions,
                     call: CallOptions) -> list[DetectResult]:
        request = pb.DetectBatchRequest(model=model or "", images=[convert.image_to_proto(i) for i in images],
                                        options=convert.options_to_proto(options))
        response = await self._call(self._stub.DetectBatch, request, call)
        return [convert.result_from_proto(r) for r in response.results]

    async def list_models(self, call: CallOptions) -> list[ModelInfo]:
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), call)
        return [convert.model_from_proto(m) for m in response.models]

    async def model_info(self, model: str, call: CallOptions) -> ModelInfo:
        return convert.model_from_proto(await self._call(self._stub.ModelInfo, pb.ModelInfoRequest(model=model or ""), call))

    async def health(self, call: CallOptions) -> bool:
        try:
            response = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=""), call)
        except errors.DetserveError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING


def _grpc_error(exc: grpc.aio.AioRpcError) -> errors.DetserveError:
    trailers = dict(exc.trailing_metadata() or ())
    cls = _BY_CODE.get(trailers.get("detserve-error", ""))  # detserve's own code, when the server sent one
    if cls is None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        cls = errors.PayloadTooLarge  # grpc's own message-size limit: retrying cannot help
    if cls is None:
        cls = _BY_GRPC_STATUS.get(exc.code(), errors.InternalError)
    return cls(exc.details() or exc.code().name, retry_after_s=_retry_after(trailers.get("retry-after")))
