"""One server interceptor for every gRPC service: bearer-token auth and undecodable messages.

grpc answers a request that fails to deserialize with INTERNAL; a client sending bad protobuf
deserves INVALID_ARGUMENT, so deserializers are wrapped to hand the handler a marker instead.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

import grpc

from ...errors import DetserveError, InvalidRequest
from ...settings import ServerSettings
from .common import fail

# Health and reflection stay open unless auth.protect_health says otherwise, like /ping on REST.
_HEALTH_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_HEALTH_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, but be broad
            return _Undecodable(exc)

    return deserialize


class _BadStreamMessage(InvalidRequest):
    """An undecodable message in a request stream (raised from inside the handler's iteration)."""


def _bad_message(marker: _Undecodable) -> InvalidRequest:
    return _BadStreamMessage(f"request is not a valid protobuf message for this method: {marker.error}")


async def _checked_stream(requests):
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _bad_message(request)
        yield request


def _rebuild(handler: grpc.RpcMethodHandler, denied: DetserveError | None) -> grpc.RpcMethodHandler:
    """The same handler with tolerant deserialization, or one that only answers `denied`.
    Refusals set the status and return (common.fail), with the detserve-error trailer of every error."""

    def unary_in(behavior):
        async def call(request, context):
            refused = denied or (_bad_message(request) if isinstance(request, _Undecodable) else None)
            if refused is not None:
                fail(context, refused)
                return None
            return await behavior(request, context)
        return call

    def stream_in(behavior):
        async def call(requests, context):
            if denied:
                fail(context, denied)
                return None
            return await behavior(_checked_stream(requests), context)
        return call

    def stream_out(behavior, wrap_requests: bool):
        def refusal(request_or_requests) -> DetserveError | None:
            if denied or wrap_requests:
                return denied
            return _bad_message(request_or_requests) if isinstance(request_or_requests, _Undecodable) else None

        def admitted(request_or_requests):
            return _checked_stream(request_or_requests) if wrap_requests else request_or_requests

        # grpc picks the streaming style from the handler's kind: keep the wrapped one's. A handler
        # that is not ours (reflection) lets _checked_stream's InvalidRequest out: grpc would send
        # that as UNKNOWN with a traceback, so it becomes the table's status here.
        if inspect.isasyncgenfunction(behavior):
            async def generator(request_or_requests, context):
                refused = refusal(request_or_requests)
                if refused is not None:
                    fail(context, refused)
                    return
                try:
                    async for response in behavior(admitted(request_or_requests), context):
                        yield response
                except _BadStreamMessage as exc:
                    fail(context, exc)
            return generator

        async def writer(request_or_requests, context):  # handlers that use context.write
            refused = refusal(request_or_requests)
            if refused is not None:
                fail(context, refused)
                return None
            try:
                return await behavior(admitted(request_or_requests), context)
            except _BadStreamMessage as exc:
                fail(context, exc)
                return None
        return writer

    kwargs = dict(request_deserializer=_tolerant(handler.request_deserializer),
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_in(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_out(handler.unary_stream, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_in(handler.stream_unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_out(handler.stream_stream, True), **kwargs)


class DoorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth=None, protect_health: bool = False):
        self._auth = auth  # service.protocols.auth.TokenAuth, or None when that module is absent
        self._protect_health = protect_health

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> DoorInterceptor:
        try:
            auth_module = importlib.import_module("service.protocols.auth")
        except ModuleNotFoundError:
            return cls(None)
        return cls(auth_module.TokenAuth.from_settings(settings.auth), settings.auth.protect_health)

    def _denied(self, details: grpc.HandlerCallDetails) -> DetserveError | None:
        if self._auth is None or not self._auth.enabled("inference"):
            return None
        method = details.method or ""
        if not self._protect_health and (method.startswith(_HEALTH_PREFIXES) or method in _HEALTH_METHODS):
            return None
        from ..auth import authorization_from_metadata

        try:
            self._auth.check("inference", authorization_from_metadata(details.invocation_metadata))
        except DetserveError as err:
            return err
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _rebuild(handler, self._denied(handler_call_details))
