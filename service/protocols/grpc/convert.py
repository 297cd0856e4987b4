"""Protobuf messages <-> service.types, for both gRPC services. No engine calls, no grpc imports.

Tensor semantics (which inputs and outputs a detector has) live in `service.protocols.kserve_codec`;
this module only moves them in and out of the KServe protobuf messages.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...engine.dataplane import check_class_count
from ...errors import DetserveError, InvalidRequest
from ...types import (
    BatchSettings, DetectOptions, DetectResult, Detection, EncodedImage, ImageInput, ModelInfo, RawImage, RLEMask,
)
from .. import kserve_codec as codec
from ..render import rendered_box
from .generated import detserve_pb2 as pb
from .generated import grpc_service_pb2 as kpb


# --- detserve.v1 -----------------------------------------------------------------------------

_OPTIONAL_FIELDS = ("score_thr", "max_dets", "iou_thr", "class_agnostic", "normalized", "tile_overlap")
_STRING_FIELDS = ("box_format", "mask_format", "tile", "tile_merge")  # proto3: "" is unset


def options_from_proto(msg: pb.DetectOptions) -> dict[str, Any]:
    """The raw option values for the data plane, which checks them (one rule for every door)."""
    values: dict[str, Any] = {name: getattr(msg, name) if msg.HasField(name) else None for name in _OPTIONAL_FIELDS}
    values.update({name: getattr(msg, name) or None for name in _STRING_FIELDS})
    check_class_count(len(msg.classes))  # before a list of 7 million empty names is built
    values["classes"] = list(msg.classes) or None
    return values


def options_to_proto(options: DetectOptions) -> pb.DetectOptions:
    msg = pb.DetectOptions(classes=list(options.classes or ()))
    for name in _OPTIONAL_FIELDS:
        value = getattr(options, name)
        if value is not None:
            setattr(msg, name, value)
    for name in _STRING_FIELDS:
        value = getattr(options, name)
        if value is not None:
            setattr(msg, name, str(getattr(value, "value", value)))
    return msg


def image_from_proto(msg: pb.Image) -> ImageInput:
    kind = msg.WhichOneof("kind")
    if kind == "encoded":
        return EncodedImage(msg.encoded)
    if kind == "raw":
        raw = msg.raw
        order = (raw.channel_order or "RGB").upper()
        if order not in ("RGB", "BGR"):
            raise InvalidRequest(f"channel_order must be RGB or BGR, got {raw.channel_order!r}")
        if raw.height <= 0 or raw.width <= 0 or len(raw.pixels) != raw.height * raw.width * 3:
            raise InvalidRequest(
                f"raw image of {raw.height}x{raw.width} needs {max(raw.height * raw.width * 3, 0)} bytes, got {len(raw.pixels)}"
            )
        return RawImage(raw.pixels, raw.height, raw.width, order)
    raise InvalidRequest("image is empty: set image.encoded (file bytes) or image.raw (pixels)")


def image_to_proto(image: ImageInput) -> pb.Image:
    if isinstance(image, EncodedImage):
        return pb.Image(encoded=image.data)
    return pb.Image(raw=pb.RawImage(pixels=image.pixels, height=image.height, width=image.width,
                                    channel_order=image.channel_order))


def result_to_proto(result: DetectResult, options: DetectOptions = DetectOptions()) -> pb.DetectResult:
    return pb.DetectResult(
        model_name=result.model_name,
        model_version=result.model_version,
        image_width=result.image_width,
        image_height=result.image_height,
        detections=[_detection_to_proto(d, rendered_box(d, options, result.image_width, result.image_height))
                    for d in result.detections],
    )


def _detection_to_proto(det: Detection, bbox: tuple[float, float, float, float]) -> pb.Detection:
    x1, y1, x2, y2 = det.box_xyxy
    msg = pb.Detection(label=det.label, class_name=det.class_name, score=det.score,
                       box=pb.BoxXYXY(x1=x1, y1=y1, x2=x2, y2=y2), bbox=bbox)
    if det.mask is not None:
        msg.mask.CopyFrom(pb.RLEMask(height=det.mask.height, width=det.mask.width, counts=det.mask.counts))
    if det.polygons is not None:
        msg.polygons.extend(pb.Polygon(points=p) for p in det.polygons)
    return msg


def result_from_proto(msg: pb.DetectResult) -> DetectResult:
    detections = []
    for d in msg.detections:
        mask = RLEMask(d.mask.height, d.mask.width, d.mask.counts) if d.HasField("mask") else None
        polygons = tuple(tuple(p.points) for p in d.polygons) or None
        detections.append(Detection(d.label, d.class_name, d.score, (d.box.x1, d.box.y1, d.box.x2, d.box.y2), mask,
                                    polygons))
    return DetectResult(detections=detections, image_width=msg.image_width, image_height=msg.image_height,
                        model_name=msg.model_name, model_version=msg.model_version)


def frame_error_to_proto(err: DetserveError, grpc_status: str) -> pb.FrameError:
    return pb.FrameError(code=err.code, grpc_status=grpc_status, message=err.message)


def model_to_proto(info: ModelInfo) -> pb.Model:
    b = info.batch
    return pb.Model(
        name=info.name, version=info.version, arch=info.arch, backend=info.backend,
        classes=list(info.classes), input_size=info.input_size, has_masks=info.has_masks, ready=info.ready,
        batch=pb.BatchSettings(max_batch_size=b.max_batch_size, max_batch_delay_ms=b.max_batch_delay_ms,
                               max_queue_size=b.max_queue_size, request_timeout_ms=b.request_timeout_ms),
        queue_depth=info.queue_depth, default_score_thr=info.default_score_thr,
    )


def model_from_proto(msg: pb.Model) -> ModelInfo:
    b = msg.batch
    return ModelInfo(
        name=msg.name, version=msg.version, arch=msg.arch, backend=msg.backend, classes=tuple(msg.classes),
        input_size=msg.input_size, has_masks=msg.has_masks, ready=msg.ready,
        batch=BatchSettings(b.max_batch_size, b.max_batch_delay_ms, b.max_queue_size, b.request_timeout_ms),
        queue_depth=msg.queue_depth, default_score_thr=msg.default_score_thr,
    )


# --- inference.GRPCInferenceService (KServe V2) --------------------------------------------

_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def parameters_from_proto(params: Mapping[str, kpb.InferParameter], where: str = "request") -> dict[str, Any]:
    codec.check_parameter_count(len(params), where)
    out = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def input_tensors_from_request(request: kpb.ModelInferRequest) -> list[codec.Tensor]:
    """Counts first (they are the client's), then one tensor per input."""
    inputs, raw = request.inputs, request.raw_input_contents  # repeated fields: len() costs nothing
    codec.refuse_extra_inputs(len(inputs), [inp.name for inp in inputs[:10]])
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(inputs)} inputs; they must pair up")
    tensors = []
    for i, inp in enumerate(inputs):
        params = parameters_from_proto(inp.parameters, f"input '{inp.name[:64]}'")
        if raw:
            if inp.HasField("contents"):  # as Triton: one place for a tensor's data, never two
                raise InvalidRequest(f"input '{inp.name[:64]}': its data is in raw_input_contents, so 'contents' "
                                     "must be unset")
            tensors.append(codec.tensor_from_raw(inp.name, inp.datatype, inp.shape, raw[i], params))
            continue
        field = _CONTENTS_FIELD.get(inp.datatype)
        if field is None:
            if inp.datatype in codec.DTYPES:  # FP16 has no typed field
                raise InvalidRequest(f"input '{inp.name}': {inp.datatype} must be sent in raw_input_contents")
            raise InvalidRequest(f"input '{inp.name}': unknown datatype {inp.datatype!r}")
        tensors.append(codec.tensor_from_contents(inp.name, inp.datatype, inp.shape, getattr(inp.contents, field), params))
    return tensors


def requested_outputs(request: kpb.ModelInferRequest) -> list[str]:
    return [o.name for o in request.outputs]


def infer_response(model: str, version: str, request_id: str, outputs: Sequence[codec.Tensor]) -> kpb.ModelInferResponse:
    """Outputs always travel in raw_output_contents: it is what Triton sends and clients expect."""
    return kpb.ModelInferResponse(
        model_name=model, model_version=version, id=request_id,
        outputs=[kpb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=list(t.shape))
                 for t in outputs],
        raw_output_contents=[codec.tensor_to_raw(t) for t in outputs],
    )


def model_metadata_to_proto(info: ModelInfo) -> kpb.ModelMetadataResponse:
    meta = codec.model_metadata(info)
    tensor = kpb.ModelMetadataResponse.TensorMetadata
    return kpb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
    )
