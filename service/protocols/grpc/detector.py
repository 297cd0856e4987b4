"""detserve.v1.Detector: thin handlers over the data plane; conversions live in convert.py."""
from __future__ import annotations

import grpc

from ...engine.dataplane import DataPlane
from ...errors import InvalidRequest
from ...types import ModelInfo, Protocol
from . import convert
from .common import (
    Call, as_detserve_error, door, fail, ordered_window, recorded, resolve_model, status_code, timeout_from,
)
from .generated import detserve_pb2 as pb
from .generated import detserve_pb2_grpc as pb_grpc

PROTOCOL = Protocol.GRPC


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, dataplane: DataPlane, default_model: str | None = None):
        self._dp = dataplane
        self._default_model = default_model

    def _resolve(self, name: str, call: Call) -> ModelInfo:
        call.model = resolve_model(self._dp, self._default_model, name)
        return self._dp.resolve(call.model)

    async def _detect(self, info: ModelInfo, images, options_msg: pb.DetectOptions, request_id: str,
                      context) -> list[pb.DetectResult]:
        options = self._dp.options(info, **convert.options_from_proto(options_msg))
        results = await self._dp.detect(info.name, images, options, protocol=PROTOCOL,
                                        request_id=request_id or None, timeout_s=timeout_from(context))
        return [convert.result_to_proto(r, options) for r in results]

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResult:
        async with door(context, self._dp, request.model, PROTOCOL.value) as call:
            info = self._resolve(request.model, call)
            if not request.HasField("image"):
                raise InvalidRequest("DetectRequest.image is required")
            results = await self._detect(info, [convert.image_from_proto(request.image)], request.options,
                                         request.request_id, context)
            return results[0]

    async def DetectBatch(self, request: pb.DetectBatchRequest, context) -> pb.DetectBatchResponse:
        async with door(context, self._dp, request.model, PROTOCOL.value) as call:
            info = self._resolve(request.model, call)
            self._dp.check_images(len(request.images))  # before converting any of them
            results = await self._detect(info, [convert.image_from_proto(img) for img in request.images],
                                         request.options, request.request_id, context)
            return pb.DetectBatchResponse(results=results)

    async def DetectStream(self, request_iterator, context):
        async def one_frame(frame: pb.StreamFrame) -> pb.StreamResult:
            try:
                async with recorded(self._dp, frame.model, PROTOCOL.value) as call:
                    info = self._resolve(frame.model, call)
                    if not frame.HasField("image"):
                        raise InvalidRequest(f"frame {frame.frame_id}: image is required")
                    results = await self._detect(info, [convert.image_from_proto(frame.image)], frame.options, "",
                                                 context)
            except Exception as exc:  # noqa: BLE001 - a bad frame is answered in-stream; the stream goes on
                err = as_detserve_error(exc)
                return pb.StreamResult(frame_id=frame.frame_id, error=convert.frame_error_to_proto(err, status_code(err).name))
            return pb.StreamResult(frame_id=frame.frame_id, result=results[0])

        try:
            async for result in ordered_window(request_iterator, one_frame):
                yield result
        except Exception as exc:  # noqa: BLE001 - the request stream itself broke (e.g. undecodable frame)
            fail(context, exc)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_to_proto(m) for m in self._dp.engine.models()])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.Model:
        async with door(context, self._dp, request.model, None):
            name = resolve_model(self._dp, self._default_model, request.model)
            return convert.model_to_proto(self._dp.engine.model_info(name))
