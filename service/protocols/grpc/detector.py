"""detserve.v1.Detector: thin handlers over the engine; conversions live in convert.py."""
from __future__ import annotations

import grpc

from ...engine.api import EngineAPI
from ...errors import InvalidRequest
from ...types import Protocol
from . import convert
from .common import abort, as_detserve_error, door, ordered_window, recorded, resolve_model, status_code, timeout_from
from .generated import detserve_pb2 as pb
from .generated import detserve_pb2_grpc as pb_grpc

PROTOCOL = Protocol.GRPC


class DetectorServicer(pb_grpc.DetectorServicer):
    def __init__(self, engine: EngineAPI, default_model: str | None = None, max_batch_images: int = 256):
        self._engine = engine
        self._default_model = default_model
        self._max_batch_images = max_batch_images

    def _model(self, name: str) -> str:
        return resolve_model(self._engine, self._default_model, name)

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResult:
        async with door(context, request.model or "-", PROTOCOL.value):
            model = self._model(request.model)
            if not request.HasField("image"):
                raise InvalidRequest("DetectRequest.image is required")
            results = await self._engine.detect(
                model, [convert.image_from_proto(request.image)], convert.options_from_proto(request.options),
                protocol=PROTOCOL, request_id=request.request_id or None, timeout_s=timeout_from(context),
            )
            return convert.result_to_proto(results[0])

    async def DetectBatch(self, request: pb.DetectBatchRequest, context) -> pb.DetectBatchResponse:
        async with door(context, request.model or "-", PROTOCOL.value):
            model = self._model(request.model)
            if not request.images:
                raise InvalidRequest("DetectBatchRequest.images is empty")
            if len(request.images) > self._max_batch_images:
                raise InvalidRequest(f"at most {self._max_batch_images} images per DetectBatch call, got {len(request.images)}")
            results = await self._engine.detect(
                model, [convert.image_from_proto(img) for img in request.images],
                convert.options_from_proto(request.options),
                protocol=PROTOCOL, request_id=request.request_id or None, timeout_s=timeout_from(context),
            )
            return pb.DetectBatchResponse(results=[convert.result_to_proto(r) for r in results])

    async def DetectStream(self, request_iterator, context):
        async def one_frame(frame: pb.StreamFrame) -> pb.StreamResult:
            try:
                async with recorded(frame.model or "-", PROTOCOL.value):
                    if not frame.HasField("image"):
                        raise InvalidRequest(f"frame {frame.frame_id}: image is required")
                    results = await self._engine.detect(
                        self._model(frame.model), [convert.image_from_proto(frame.image)],
                        convert.options_from_proto(frame.options), protocol=PROTOCOL, timeout_s=timeout_from(context),
                    )
            except Exception as exc:  # noqa: BLE001 - a bad frame is answered in-stream; the stream goes on
                err = as_detserve_error(exc)
                return pb.StreamResult(frame_id=frame.frame_id, error=convert.frame_error_to_proto(err, status_code(err).name))
            return pb.StreamResult(frame_id=frame.frame_id, result=convert.result_to_proto(results[0]))

        try:
            async for result in ordered_window(request_iterator, one_frame):
                yield result
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the request stream itself broke (e.g. undecodable frame)
            await abort(context, exc)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_to_proto(m) for m in self._engine.models()])

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.Model:
        async with door(context, request.model or "-", None):
            return convert.model_to_proto(self._engine.model_info(self._model(request.model)))
