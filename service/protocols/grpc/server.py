"""The gRPC server: detserve.v1.Detector, inference.GRPCInferenceService, grpc.health.v1 and reflection.

`start_grpc_server(engine, settings)` is what `service.server.run_server` calls; the caller stops
the returned server (`await server.stop(grace)`), which also ends the health updater.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ...engine.api import EngineAPI
from ...engine.dataplane import DataPlane
from ...settings import ServerSettings
from .detector import DetectorServicer
from .generated import detserve_pb2, detserve_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from .interceptor import DoorInterceptor
from .kserve import KServeServicer

log = logging.getLogger(__name__)

DETECTOR_SERVICE = detserve_pb2.DESCRIPTOR.services_by_name["Detector"].full_name
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_POLL_S = 0.5


async def start_grpc_server(engine: EngineAPI, settings: ServerSettings,
                            dataplane: DataPlane | None = None) -> grpc.aio.Server:
    """Bind settings.grpc_address:grpc_port (port 0 picks a free one: read `server.detserve_port`).
    `dataplane` is the one run_server shares with the HTTP doors (readiness, validation, metrics)."""
    dp = dataplane or DataPlane(engine, max_images_per_request=settings.max_images_per_request)
    server = grpc.aio.server(
        interceptors=[DoorInterceptor.from_settings(settings)],
        options=[
            ("grpc.max_receive_message_length", settings.max_request_size),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
    )
    detserve_pb2_grpc.add_DetectorServicer_to_server(DetectorServicer(dp, settings.default_model), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dp), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (DETECTOR_SERVICE, KSERVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(f"{_host(settings.grpc_address)}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"gRPC: cannot bind {settings.grpc_address}:{settings.grpc_port}")
    server.detserve_port = port  # type: ignore[attr-defined]
    await server.start()
    await _update_health(dp, health, {})
    updater = asyncio.get_running_loop().create_task(_health_updater(dp, health, server))
    plain_stop = server.stop

    async def stop(grace: float | None) -> None:
        # Tell health watchers first, so load balancers drain us before connections close.
        await health.enter_graceful_shutdown()
        await plain_stop(grace)
        updater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await updater

    server.stop = stop  # type: ignore[method-assign]
    log.info("gRPC listening on %s:%d", settings.grpc_address, port)
    return server


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


async def _health_updater(dp: DataPlane, health: HealthServicer, server: grpc.aio.Server) -> None:
    """Mirror engine readiness into grpc.health.v1 until the server stops."""
    stopped = asyncio.ensure_future(server.wait_for_termination())
    known: dict[str, int] = {}
    try:
        while not stopped.done():
            await asyncio.wait([stopped], timeout=HEALTH_POLL_S)
            with contextlib.suppress(Exception):  # a health poll must never kill the server
                await _update_health(dp, health, known)
    finally:
        stopped.cancel()


async def _update_health(dp: DataPlane, health: HealthServicer, known: dict[str, int]) -> None:
    """Per-model status under the model's name; "" and the service names follow overall readiness.
    Models that disappear (unloaded) turn NOT_SERVING rather than vanishing, so watchers see it."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    wanted = {"": serving if dp.ready() else not_serving}
    for service in (DETECTOR_SERVICE, KSERVE_SERVICE):
        wanted[service] = wanted[""]
    for info in dp.engine.models():
        wanted[info.name] = serving if dp.model_ready(info.name) else not_serving
    for name in known:
        wanted.setdefault(name, not_serving)
    for name, status in wanted.items():
        if known.get(name) != status:
            await health.set(name, status)
            known[name] = status
