"""inference.GRPCInferenceService (KServe V2 / Triton gRPC): thin handlers over the engine.

Tensor semantics are shared with the REST door through `service.protocols.kserve_codec`.
"""
from __future__ import annotations

import grpc

from ...engine.dataplane import DataPlane
from ...types import Protocol
from .. import kserve_codec as codec
from . import convert
from .common import as_detserve_error, door, fail, ordered_window, recorded, timeout_from
from .generated import grpc_service_pb2 as kpb
from .generated import grpc_service_pb2_grpc as kpb_grpc

PROTOCOL = Protocol.KSERVE_GRPC


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane):
        self._dp = dataplane

    async def ServerLive(self, request, context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=self._dp.live())

    async def ServerReady(self, request, context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._dp.ready())

    async def ModelReady(self, request: kpb.ModelReadyRequest, context) -> kpb.ModelReadyResponse:
        async with door(context, self._dp, request.name, None):
            codec.check_version(self._dp.engine.model_info(request.name), request.version)
            return kpb.ModelReadyResponse(ready=self._dp.model_ready(request.name))

    async def ServerMetadata(self, request, context) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(**codec.server_metadata(codec.server_version()))

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context) -> kpb.ModelMetadataResponse:
        async with door(context, self._dp, request.name, None):
            info = self._dp.engine.model_info(request.name)
            codec.check_version(info, request.version)
            return convert.model_metadata_to_proto(info)

    async def _infer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        # The model and version first: an unknown one is NOT_FOUND whatever the tensors hold.
        info = codec.resolve(self._dp, request.model_name, request.model_version)
        inputs = convert.input_tensors_from_request(request)
        parameters = convert.parameters_from_proto(request.parameters)
        outcome = await codec.infer(
            self._dp, info, inputs, parameters,
            convert.requested_outputs(request),
            protocol=PROTOCOL, request_id=request.id or None, timeout_s=timeout_from(context),
        )
        return convert.infer_response(outcome.model_name, outcome.model_version, request.id, outcome.outputs)

    async def ModelInfer(self, request: kpb.ModelInferRequest, context) -> kpb.ModelInferResponse:
        async with door(context, self._dp, request.model_name, PROTOCOL.value):
            return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton semantics: a failed request is answered with `error_message`; the stream goes on."""

        async def one(request: kpb.ModelInferRequest) -> kpb.ModelStreamInferResponse:
            try:
                async with recorded(self._dp, request.model_name, PROTOCOL.value):
                    return kpb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
            except Exception as exc:  # noqa: BLE001
                return kpb.ModelStreamInferResponse(
                    error_message=as_detserve_error(exc).message,
                    infer_response=kpb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )

        try:
            async for response in ordered_window(request_iterator, one):
                yield response
        except Exception as exc:  # noqa: BLE001 - the request stream itself broke
            fail(context, exc)
