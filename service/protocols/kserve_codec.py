"""KServe V2 / Open Inference Protocol tensors <-> detserve types, shared by the REST and gRPC doors.

Wire framing differs between the doors (JSON + binary extension over HTTP, protobuf over gRPC);
everything after that (which tensors a detector takes and returns, their datatypes and shapes,
request parameters) lives here, once.

Inputs: one tensor, either BYTES [N] (or [N,1], [1]) of encoded image files, or UINT8 [N,H,W,3] /
[H,W,3] pixels (RGB unless the `channel_order` parameter says BGR).
Outputs (K = most detections of any image in the batch; shorter rows are zero-padded):
`boxes` FP32 [N,K,4] xyxy original-image pixels (or as the `box_format` / `normalized` parameters
ask), `scores` FP32 [N,K], `labels` INT32 [N,K], `num_detections` INT32 [N], and for mask models
`masks_rle` BYTES [N,K] (a COCO RLE JSON per detection, "" for padding); with the parameter
`mask_format=polygon` it is `masks_polygon` instead (a JSON list of flat [x0, y0, x1, y1, ...]
outlines per detection), with `mask_format=none` there is no mask output.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidRequest, ModelNotFound, PayloadTooLarge
from ..types import DetectOptions, DetectResult, EncodedImage, ImageInput, MaskFormat, ModelInfo, RawImage
from .render import rendered_box

SERVER_NAME = "detserve"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "detserve_rtmdet"

INPUT_NAME = "image"
# Numpy dtypes by KServe datatype; BYTES is a list of bytes objects, not an ndarray.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
# A coarse bound on the images one tensor may hold, checked from its shape before any per-image
# object is built: a 4 MB body of empty BYTES elements would otherwise become a million objects.
# The data plane's max_images_per_request (smaller) applies afterwards.
MAX_TENSOR_IMAGES = 4096
# An image batch is rank 1 (BYTES) or 4 (NHWC pixels); 8 is Triton's limit. A dimension above 2**31
# cannot be a real image tensor, and numpy refuses shapes whose product overflows even when another
# dimension is 0 (then the byte-size check passes and the reshape would fail).
MAX_RANK = 8
MAX_DIM = 2**31 - 1
# Counts inside one request, checked before any per-item object is built: within the 16 MiB size
# limit a gRPC request holds 700,000 empty inputs (measured: 3.4 s of the front's one event loop to
# convert, stalling every door) or 600,000 parameters. A detector has one input and reads a dozen
# options (dataplane.OPTION_NAMES); other parameters are ignored, up to this many.
MAX_PARAMETERS = 256


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]  # ndarray shaped `shape`; BYTES: flat list of elements
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# --- element framing -------------------------------------------------------------------------

def _element_count(shape: Sequence[int]) -> int:
    if len(shape) > MAX_RANK:
        raise InvalidRequest(f"tensor shape has {len(shape)} dimensions; at most {MAX_RANK} are allowed")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"tensor shape {list(shape)} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise InvalidRequest(f"tensor shape {list(shape)} has a dimension above {MAX_DIM}")
    return math.prod(shape)


def unpack_bytes_elements(raw: bytes, expected: int | None = None) -> list[bytes]:
    """Split a serialized BYTES tensor: each element is a 4-byte little-endian length, then data.
    With `expected` (the shape's count) it stops at the first element past it: 16 MB of empty
    elements are 4 million of them."""
    items, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if expected is not None and len(items) == expected:
            raise InvalidRequest(f"BYTES tensor data holds more than the {expected} element(s) its shape declares")
        if offset + 4 > len(raw):
            raise InvalidRequest("BYTES tensor data is truncated inside an element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequest("BYTES tensor element is longer than the data that follows it")
        items.append(bytes(view[offset:offset + size]))
        offset += size
    return items


def pack_bytes_elements(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _checked_datatype(name: str, datatype: str) -> str:
    if datatype != BYTES and datatype not in DTYPES:
        raise InvalidRequest(f"input '{name[:64]}': unknown datatype {datatype[:40]!r}")
    return datatype


def _check_image_count(name: str, datatype: str, shape: tuple[int, ...], count: int) -> None:
    images = count if datatype == BYTES else (shape[0] if len(shape) == 4 else 1)
    if images > MAX_TENSOR_IMAGES:
        raise PayloadTooLarge(f"input '{name}': shape {list(shape)} holds {images} images; "
                              f"at most {MAX_TENSOR_IMAGES} per tensor")


def _checked_frame(name: str, datatype: str, shape: Sequence[int]) -> tuple[str, tuple[int, ...], int]:
    """Datatype, shape and element count, checked before a byte of the data is touched."""
    datatype, shape = _checked_datatype(name, datatype), tuple(int(d) for d in shape)
    count = _element_count(shape)
    _check_image_count(name, datatype, shape, count)
    return datatype, shape, count


def tensor_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes, parameters=None) -> Tensor:
    """A tensor from its binary form (HTTP binary extension, gRPC raw_input_contents)."""
    datatype, shape, count = _checked_frame(name, datatype, shape)
    if datatype == BYTES:
        try:
            items = unpack_bytes_elements(raw, count)
        except InvalidRequest as exc:
            raise InvalidRequest(f"input '{name}': shape {list(shape)}: {exc.message}") from None
        if len(items) != count:
            raise InvalidRequest(f"input '{name}': shape {list(shape)} needs {count} BYTES elements, got {len(items)}")
        return Tensor(name, datatype, shape, items, dict(parameters or {}))
    dtype = DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequest(
            f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, got {len(raw)}"
        )
    try:
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. a 0 beside dimensions whose product numpy cannot index
        raise InvalidRequest(f"input '{name}': shape {list(shape)} is not a valid array shape: {exc}") from None
    return Tensor(name, datatype, shape, array, dict(parameters or {}))


def _flatten(name: str, values: list) -> list:
    """Nested JSON `data` to a flat list, a level at a time (a deep nesting must be a 400, not a
    RecursionError); a level whose first element is not a list is the innermost."""
    for _ in range(MAX_RANK):
        if not values or not isinstance(values[0], list):
            return values
        values = [v for sub in values for v in (sub if isinstance(sub, list) else (sub,))]
    if values and isinstance(values[0], list):
        raise InvalidRequest(f"input '{name}': 'data' is nested deeper than {MAX_RANK} levels")
    return values


def _element_bytes(value: Any) -> bytes:
    """A BYTES element from JSON: a base64 string or {"b64": "..."} (JSON cannot carry raw bytes)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        value = value["b64"]
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("BYTES image elements in JSON must be base64 strings") from None
    raise InvalidRequest(f"BYTES element of type {type(value).__name__} is not a string")


def tensor_from_values(name: str, datatype: str, shape: Sequence[int], values: Any, parameters=None) -> Tensor:
    """A tensor from JSON `data`, nested or flat (gRPC `contents`: tensor_from_contents)."""
    datatype, shape = _checked_datatype(name, datatype), tuple(int(d) for d in shape)
    if not isinstance(values, (list, tuple)):
        raise InvalidRequest(f"input '{name}': 'data' must be a list, got {type(values).__name__}")
    count = _element_count(shape)
    _check_image_count(name, datatype, shape, count)
    flat = _flatten(name, list(values))
    if len(flat) != count:
        raise InvalidRequest(f"input '{name}': shape {list(shape)} needs {count} elements, got {len(flat)}")
    if datatype == BYTES:
        return Tensor(name, datatype, shape, [_element_bytes(v) for v in flat], dict(parameters or {}))
    try:
        array = np.asarray(flat, dtype=DTYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"input '{name}': data is not {datatype}: {exc}") from None
    return Tensor(name, datatype, shape, array, dict(parameters or {}))


def tensor_from_contents(name: str, datatype: str, shape: Sequence[int], values: Sequence, parameters=None) -> Tensor:
    """A tensor from gRPC typed `contents`: flat, with its length known before a value is copied.
    A 10 MB message of one-byte elements is millions of Python objects once listed: the count is
    checked first, and numbers go straight into their array."""
    datatype, shape, count = _checked_frame(name, datatype, shape)
    if len(values) != count:
        raise InvalidRequest(f"input '{name}': shape {list(shape)} needs {count} elements, got {len(values)}")
    if datatype == BYTES:
        return Tensor(name, datatype, shape, list(values), dict(parameters or {}))
    try:
        array = np.fromiter(values, dtype=DTYPES[datatype], count=count).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"input '{name}': data is not {datatype}: {exc}") from None
    return Tensor(name, datatype, shape, array, dict(parameters or {}))


def tensor_to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == BYTES:
        return pack_bytes_elements(tensor.data)  # type: ignore[arg-type]
    return np.ascontiguousarray(tensor.data, dtype=DTYPES[tensor.datatype]).tobytes()


def tensor_to_values(tensor: Tensor) -> list:
    """Flat JSON-friendly values; BYTES elements become text (they are JSON strings or empty)."""
    if tensor.datatype == BYTES:
        return [b.decode("utf-8", "replace") for b in tensor.data]  # type: ignore[union-attr]
    return np.asarray(tensor.data).reshape(-1).tolist()


# --- detector semantics ----------------------------------------------------------------------

def input_specs() -> list[TensorSpec]:
    # BYTES is what metadata can show; UINT8 [N,H,W,3] pixels are accepted under the same name.
    return [TensorSpec(INPUT_NAME, BYTES, (-1,))]


MASK_OUTPUTS = {MaskFormat.RLE: "masks_rle", MaskFormat.POLYGON: "masks_polygon"}


def output_specs(has_masks: bool, mask_format: MaskFormat | None = None) -> list[TensorSpec]:
    """The outputs a request gets; metadata shows the default (`mask_format` rle)."""
    specs = [
        TensorSpec("boxes", "FP32", (-1, -1, 4)),
        TensorSpec("scores", "FP32", (-1, -1)),
        TensorSpec("labels", "INT32", (-1, -1)),
        TensorSpec("num_detections", "INT32", (-1,)),
    ]
    mask_output = MASK_OUTPUTS.get(mask_format or MaskFormat.RLE)
    if has_masks and mask_output:
        specs.append(TensorSpec(mask_output, BYTES, (-1, -1)))
    return specs


def model_metadata(info: ModelInfo) -> dict:
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": PLATFORM,
        "inputs": [s.to_json() for s in input_specs()],
        "outputs": [s.to_json() for s in output_specs(info.has_masks)],
    }


def server_metadata(version: str) -> dict:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def check_version(info: ModelInfo, version: str | None) -> None:
    """An empty version means the served one; any other must match it."""
    if version and version != info.version:
        raise ModelNotFound(f"model '{info.name}' has no version '{version}' (serving '{info.version}')")


def refuse_extra_inputs(count: int, names: Sequence[str]) -> None:
    """A detector has one input. Doors call this before building any tensor (`names`: the first
    few are enough), so a request of 700,000 inputs is refused at the cost of one. Doors resolve
    the model and its version first (404 before 400); none at all is refused in images_from_inputs."""
    if count > 1:
        shown = [name[:64] if isinstance(name, str) else "?" for name in names[:10]]  # str() of a deep list recurses
        more = f" and {count - len(shown)} more" if count > len(shown) else ""
        raise InvalidRequest(f"expected one input tensor, got {count}: {shown}{more}")


def check_parameter_count(count: int, where: str) -> None:
    if count > MAX_PARAMETERS:
        raise InvalidRequest(f"{where} has {count} parameters; at most {MAX_PARAMETERS} are accepted")


def images_from_inputs(inputs: Sequence[Tensor]) -> list[ImageInput]:
    if not inputs:
        raise InvalidRequest(f"no input tensor: send one BYTES (encoded images) or UINT8 (HWC pixels) input named '{INPUT_NAME}'")
    refuse_extra_inputs(len(inputs), [t.name for t in inputs[:10]])
    tensor = inputs[0]
    if tensor.name != INPUT_NAME:  # as Triton refuses an input its model does not declare
        raise InvalidRequest(f"unexpected input '{tensor.name}': this model's input is '{INPUT_NAME}'")
    if tensor.datatype == BYTES:
        images: list[ImageInput] = [EncodedImage(b) for b in tensor.data]  # type: ignore[union-attr]
    elif tensor.datatype == "UINT8":
        images = _raw_images(tensor)
    else:
        raise InvalidRequest(
            f"input '{tensor.name}' has datatype {tensor.datatype}; expected BYTES (encoded images) or UINT8 (HWC pixels)"
        )
    if not images:
        raise InvalidRequest(f"input '{tensor.name}' holds no images")
    return images


def _raw_images(tensor: Tensor) -> list[ImageInput]:
    pixels = np.asarray(tensor.data)
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise InvalidRequest(f"UINT8 input '{tensor.name}' must be [N,H,W,3] or [H,W,3], got {list(tensor.shape)}")
    order = tensor.parameters.get("channel_order", "RGB")
    if not isinstance(order, str) or order.upper() not in ("RGB", "BGR"):
        shown = repr(order[:40]) if isinstance(order, str) else f"a {type(order).__name__}"
        raise InvalidRequest(f"channel_order must be RGB or BGR, got {shown}")
    order = order.upper()
    _, height, width, _ = pixels.shape
    return [RawImage(np.ascontiguousarray(img).tobytes(), int(height), int(width), order) for img in pixels]


def parameters_object(value: Any, where: str) -> dict[str, Any]:
    """A `parameters` member as a dict: absent or null is empty; anything but an object is refused."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{where} 'parameters' must be a JSON object, got {type(value).__name__}")
    check_parameter_count(len(value), where)
    return dict(value)


def detection_outputs(results: Sequence[DetectResult], has_masks: bool,
                      options: DetectOptions = DetectOptions()) -> list[Tensor]:
    """Every output of `output_specs` for a batch of results, zero-padded to the longest detection list."""
    n = len(results)
    k = max((len(r.detections) for r in results), default=0)
    boxes = np.zeros((n, k, 4), dtype=np.float32)
    scores = np.zeros((n, k), dtype=np.float32)
    labels = np.zeros((n, k), dtype=np.int32)
    counts = np.zeros((n,), dtype=np.int32)
    mask_output = MASK_OUTPUTS.get(options.mask_format or MaskFormat.RLE) if has_masks else None
    masks: list[bytes] = []
    for i, result in enumerate(results):
        counts[i] = len(result.detections)
        for j, det in enumerate(result.detections):
            boxes[i, j] = rendered_box(det, options, result.image_width, result.image_height)
            scores[i, j] = det.score
            labels[i, j] = det.label
        if mask_output is not None:
            row = [_mask_element(d) for d in result.detections]
            masks += row + [b""] * (k - len(row))
    tensors = [
        Tensor("boxes", "FP32", (n, k, 4), boxes),
        Tensor("scores", "FP32", (n, k), scores),
        Tensor("labels", "INT32", (n, k), labels),
        Tensor("num_detections", "INT32", (n,), counts),
    ]
    if mask_output is not None:
        tensors.append(Tensor(mask_output, BYTES, (n, k), masks))
    return tensors


def _mask_element(det) -> bytes:
    if det.polygons is not None:
        return json.dumps([list(p) for p in det.polygons]).encode()
    return json.dumps(det.mask.to_coco()).encode() if det.mask else b""


def select_outputs(tensors: list[Tensor], requested: Sequence[str]) -> list[Tensor]:
    """The requested outputs in request order; all of them when none were requested. The names
    were checked by `check_requested` before the images ran."""
    if not requested:
        return tensors
    by_name = {t.name: t for t in tensors}
    return [by_name[name] for name in requested]


def check_requested(requested: Sequence[str], names: Sequence[str]) -> None:
    """Refuse, before any compute, an output the model does not have or one asked for twice; in
    linear time, since a request may name an output a million times within its size limit."""
    known = set(names)
    unknown = list(dict.fromkeys(name for name in requested if name not in known))
    if unknown:
        raise InvalidRequest(f"unknown output(s) {_first(unknown)}; this model has {list(names)}")
    twice = sorted(name for name, times in Counter(requested).items() if times > 1)
    if twice:
        raise InvalidRequest(f"output(s) {twice} requested more than once")


def _first(names: list[str], count: int = 10) -> str:
    shown = [name[:64] for name in names[:count]]
    return f"{shown}" + (f" and {len(names) - count} more" if len(names) > count else "")


# --- the one inference step both KServe doors run -------------------------------------------

@dataclass(slots=True)
class InferOutcome:
    model_name: str
    model_version: str
    outputs: list[Tensor]


def resolve(dp, model: str, version: str | None) -> ModelInfo:
    """The model a KServe request names, refused (503 starting, 404 unknown or another version)
    before its body is parsed: doors call this first, then `infer` with what it returns."""
    info = dp.resolve(model)
    check_version(info, version)
    return info


async def infer(
    dp,
    info: ModelInfo,
    inputs: Sequence[Tensor],
    parameters: Mapping[str, Any],
    requested: Sequence[str],
    *,
    protocol,
    request_id: str | None = None,
    timeout_s: float | None = None,
) -> InferOutcome:
    """Validate the request against the model, run it through the data plane, build the outputs.
    Request parameters (`score_thr`, `max_dets`, `classes`, `iou_thr`, `box_format`, `mask_format`,
    `tile`, ...: engine/dataplane.py OPTION_NAMES) are checked by the data plane; others are ignored."""
    images = images_from_inputs(inputs)
    options = dp.options_from(info, parameters)
    check_requested(requested, [spec.name for spec in output_specs(info.has_masks, options.mask_format)])
    results = await dp.detect(info.name, images, options, protocol=protocol, request_id=request_id, timeout_s=timeout_s)
    outputs = select_outputs(detection_outputs(results, info.has_masks, options), requested)
    served_version = next((r.model_version for r in results if r.model_version), info.version)
    return InferOutcome(info.name, served_version, outputs)


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("detserve")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "0.0.0"
