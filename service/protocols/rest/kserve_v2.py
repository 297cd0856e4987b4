"""KServe V2 / Open Inference Protocol over HTTP, with the binary tensor extension.

Tensor semantics are shared with the gRPC door (`service.protocols.kserve_codec`); this module
only frames them as JSON and binary bodies. Errors are raised to the app's one error table
(rest/app.py), which adds the V2 `"error"` field under `/v2/`.
"""
from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...engine.dataplane import DataPlane, dataplane_for
from ...errors import DetserveError, InvalidRequest, http_status
from ...types import Protocol
from .. import kserve_codec as codec

router = APIRouter(tags=["kserve-v2"])
PROTOCOL = Protocol.KSERVE_REST
HEADER_LENGTH = "inference-header-content-length"


def _json(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _dp(request: Request) -> DataPlane:
    return dataplane_for(request.app.state)


@router.get("/v2")
async def server_metadata() -> Response:
    return _json(codec.server_metadata(codec.server_version()))


@router.get("/v2/health/live")
async def health_live(request: Request) -> Response:
    live = _dp(request).live()
    return _json({"live": live}, 200 if live else 503)


@router.get("/v2/health/ready")
async def health_ready(request: Request) -> Response:
    ready = _dp(request).ready()
    return _json({"ready": ready}, 200 if ready else 503)


@router.get("/v2/models/{model}")
@router.get("/v2/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: str | None = None) -> Response:
    info = _dp(request).engine.model_info(model)
    codec.check_version(info, version)
    return _json(codec.model_metadata(info))


@router.get("/v2/models/{model}/ready")
@router.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: str | None = None) -> Response:
    dp = _dp(request)
    codec.check_version(dp.engine.model_info(model), version)
    ready = dp.model_ready(model)
    return _json({"name": model, "ready": ready}, 200 if ready else 503)


@router.post("/v2/models/{model}/infer")
@router.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    return await infer_call(_dp(request), model, version, request.headers.get(HEADER_LENGTH), request.body)


_MODELS_PREFIX, _INFER_SUFFIX = "/v2/models/", "/infer"


def match_infer(method: str, path: str) -> tuple[str, str | None] | None:
    """(model, version) when `method path` is what the two infer routes above match (Starlette's
    `{param}` is one non-empty segment), else None: the direct door (rest/direct.py) asks."""
    if method != "POST" or not path.startswith(_MODELS_PREFIX) or not path.endswith(_INFER_SUFFIX):
        return None
    parts = path[len(_MODELS_PREFIX):len(path) - len(_INFER_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


async def infer_call(dp: DataPlane, model: str, version: str | None, header_length: str | None,
                     read_body) -> Response:
    """One V2 infer end to end, for the FastAPI route and the direct door. `read_body()` returns the
    whole body; `header_length` is the Inference-Header-Content-Length header."""
    started = time.perf_counter()
    code = 500
    try:
        response = await _infer(dp, model, version, header_length, read_body)
        code = response.status_code
        return response
    except DetserveError as err:
        code = http_status(err)
        raise  # the app's one error table renders it, in the V2 shape under /v2/
    finally:
        dp.record(model, PROTOCOL.value, code, time.perf_counter() - started)


async def _infer(dp: DataPlane, model: str, version: str | None, header_length: str | None, read_body) -> Response:
    info = codec.resolve(dp, model, version)  # 503 while starting, 404 before reading a large body
    header, inputs = _parse_request(await read_body(), header_length)
    parameters = codec.parameters_object(header.get("parameters"), "request")
    binary_default = _flag(parameters.pop("binary_data_output", False), "binary_data_output")
    requested = header.get("outputs") or []
    if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        raise InvalidRequest("'outputs' must be a list of objects with a 'name'")
    # Every output's parameters are checked here, before inference spends any compute.
    binary_for = {o["name"]: _flag(codec.parameters_object(o.get("parameters"), f"output '{o['name']}'")
                                   .get("binary_data", binary_default), "binary_data") for o in requested}
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, (str, int)):
        raise InvalidRequest(f"'id' must be a string, got {type(request_id).__name__}")
    outcome = await codec.infer(
        dp, info, inputs, parameters, [o["name"] for o in requested],
        protocol=PROTOCOL, request_id=str(request_id)[:256] if request_id else None,
    )
    return _render(outcome, request_id, lambda name: binary_for.get(name, binary_default))


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter '{name}' must be true or false, got {type(value).__name__}")
    return value


def _parse_request(body: bytes, header_length: str | None) -> tuple[dict, list[codec.Tensor]]:
    """The JSON header and the input tensors, from a JSON, binary-extension or raw body."""
    if header_length is not None:
        # ASCII digits only: str.isdigit() also accepts "²", which int() then refuses.
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 20 or int(digits) > len(body):
            raise InvalidRequest(f"Inference-Header-Content-Length {header_length[:40]!r} does not fit a {len(body)}-byte body")
        split = int(digits)
        if split == 0:  # raw mode: the whole body is one encoded image
            return {}, [codec.Tensor(codec.INPUT_NAME, codec.BYTES, (1,), [body])]
        header_bytes, binary = body[:split], memoryview(body)[split:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidRequest("request must be a JSON object with an 'inputs' list")
    return header, _parse_inputs(header["inputs"], binary)


def _parse_inputs(entries: list, binary: memoryview) -> list[codec.Tensor]:
    codec.refuse_extra_inputs(len(entries), [e.get("name") if isinstance(e, dict) else None for e in entries[:10]])
    tensors, offset = [], 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidRequest("each input must be a JSON object")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidRequest("each input needs 'name' (string), 'datatype' (string) and 'shape' (list of ints)")
        parameters = codec.parameters_object(entry.get("parameters"), f"input '{name}'")
        size = parameters.pop("binary_data_size", None)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                shown = size if isinstance(size, int) and not isinstance(size, bool) else f"of type {type(size).__name__}"
                raise InvalidRequest(f"input '{name[:64]}': binary_data_size {shown} runs past the end of the body")
            tensors.append(codec.tensor_from_raw(name, datatype, shape, bytes(binary[offset:offset + size]), parameters))
            offset += size
        elif "data" in entry:
            tensors.append(codec.tensor_from_values(name, datatype, shape, entry["data"], parameters))
        else:
            raise InvalidRequest(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    return tensors


def _render(outcome: codec.InferOutcome, request_id: Any, binary) -> Response:
    outputs, chunks = [], []
    for tensor in outcome.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary(tensor.name):
            raw = codec.tensor_to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = codec.tensor_to_values(tensor)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": outcome.model_name, "model_version": outcome.model_version, "outputs": outputs}
    if request_id:
        body["id"] = request_id
    header = orjson.dumps(body)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})
