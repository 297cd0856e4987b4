"""The front process: engine + inference, management and metrics HTTP servers (+ gRPC) in one loop.

It moves bytes and formats responses only; decoding and inference run in the engine's worker
processes, so this module (and everything it imports at start-up) stays free of torch.

Shutdown (SIGTERM/SIGINT): the data plane turns every door's readiness false, the listeners close
(no new connections), in-flight HTTP requests finish (up to drain_timeout_s; uploads still arriving
then are answered 503) while gRPC drains beside them, then the engine drains its queue in what is
left of that one budget and stops its workers; the process exits 0. The workers ignore both signals, so a signal to the whole process
group drains the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass

from .errors import ConfigError
from .settings import ServerSettings

log = logging.getLogger("detserve.server")



def _graceful_timeout_s(settings: ServerSettings) -> int:
    return max(1, int(settings.drain_timeout_s))


class _Uvicorn:
    """Lazily built so importing this module does not import uvicorn's protocol stack."""

    @staticmethod
    def server(app, settings: ServerSettings):
        import uvicorn

        try:
            from .protocols.rest.app import InferenceApp
            from .protocols.rest.limits import bounded_protocol
        except ImportError:  # no httptools: h11 bounds the headers itself, the sweeper has nothing to do
            http, h11_limit = "h11", settings.limits.max_header_bytes
        else:
            from .protocols.rest.direct import DirectDoor

            direct = DirectDoor(app) if isinstance(app, InferenceApp) else None  # /predictions without ASGI
            http, h11_limit = bounded_protocol(settings.limits, settings.max_request_size, direct), None

        class QuietSignalsServer(uvicorn.Server):
            # run_server owns SIGTERM/SIGINT for all servers; uvicorn would otherwise install its own
            # handlers and re-raise the signal after its shutdown, killing the process mid-drain.
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, server_header=False,
            timeout_graceful_shutdown=_graceful_timeout_s(settings), ws="none", http=http,
            timeout_keep_alive=settings.limits.keep_alive_timeout_s, limit_concurrency=settings.limits.max_connections,
            **({"h11_max_incomplete_event_size": h11_limit} if h11_limit else {}),
        )
        return QuietSignalsServer(config)


@dataclass
class _Listener:
    name: str
    host: str
    port: int
    sock: socket.socket


def bind(name: str, host: str, port: int) -> _Listener:
    """Bind here rather than in uvicorn so a busy port is a clear ConfigError, and port 0 works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind the {name} API to {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return _Listener(name, host, sock.getsockname()[1], sock)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _log_bindings(listeners: list[_Listener], settings: ServerSettings) -> None:
    for lst in listeners:
        log.info("%s API listening on %s:%d", lst.name, lst.host, lst.port, extra={"api": lst.name, "port": lst.port})
    mgmt = next(lst for lst in listeners if lst.name == "management")
    if _is_loopback(mgmt.host):
        log.info("management API bound to %s:%d (localhost only)", mgmt.host, mgmt.port)
    elif settings.auth.management_tokens or settings.auth.management_tokens_file:
        log.warning("management API bound to %s:%d and reachable from the network (token auth on)", mgmt.host, mgmt.port)
    else:
        log.warning("management API bound to %s:%d and reachable from the network WITHOUT auth: anyone who can "
                    "reach it can load, unload and scale models", mgmt.host, mgmt.port)


def _label_studio_jobs():
    """The Label Studio routes module (start_jobs / stop_jobs), or None when it cannot be imported."""
    try:
        from .protocols.rest import labelstudio
    except ImportError:
        return None
    return labelstudio


def _grpc_module():
    try:
        return importlib.import_module("service.protocols.grpc.server")
    except ModuleNotFoundError as exc:
        if exc.name != "service.protocols.grpc.server":
            raise
        return None


async def serve(settings: ServerSettings, *, engine=None, stop_event: asyncio.Event | None = None) -> int:
    """Run until `stop_event` is set (SIGTERM/SIGINT set it), then drain. Returns the exit code."""
    from .protocols.rest.app import build_inference_app, build_management_app, build_metrics_app

    if settings.cache_dir is not None:
        # Workers resolve backend = "auto" themselves and inherit the environment, not the settings.
        os.environ["DETSERVE_CACHE_DIR"] = str(settings.cache_dir)
    if engine is None:
        from .engine.engine import Engine

        # DETSERVE_PREDICTOR_FACTORY is a test hook: integration tests run the real engine and
        # workers around a scripted predictor. Unset, the engine uses the real Predictor.
        factory = os.environ.get("DETSERVE_PREDICTOR_FACTORY") or None
        engine = Engine(settings, predictor_factory=factory)
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop_event.set)

    listeners = [
        bind("inference", settings.inference_address, settings.inference_port),
        bind("management", settings.management_address, settings.management_port),
        bind("metrics", settings.metrics_address, settings.metrics_port),
    ]
    from .engine.dataplane import DataPlane

    dataplane = DataPlane(engine, max_images_per_request=settings.max_images_per_request)
    inference_app = build_inference_app(engine, settings, dataplane)
    apps = [inference_app, build_management_app(engine, settings), build_metrics_app(settings)]
    servers = [_Uvicorn.server(app, settings) for app in apps]

    # Serve HTTP while the models load, so probes get answers: /healthz 200, /readyz 503 until ready.
    dataplane.starting = True
    tasks = [asyncio.create_task(srv.serve(sockets=[lst.sock]), name=f"http-{lst.name}")
             for srv, lst in zip(servers, listeners)]
    sweeper = asyncio.create_task(_sweep(servers), name="http-limits")
    _log_bindings(listeners, settings)
    log.info("starting engine", extra={"model_store": str(settings.model_store)})
    grpc_server = None
    try:
        await engine.start()
        grpc_module = _grpc_module() if settings.enable_grpc else None
        if grpc_module is not None:
            grpc_server = await grpc_module.start_grpc_server(engine, settings, dataplane)  # it logs its own address
    except Exception as exc:
        log.error("start-up failed: %s", getattr(exc, "message", None) or repr(exc))
        for srv in servers:
            srv.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        sweeper.cancel()
        with contextlib.suppress(Exception):
            await engine.stop(0)
        return 1
    dataplane.starting = False
    ls_jobs = _label_studio_jobs()
    if ls_jobs is not None:
        try:
            await ls_jobs.start_jobs(inference_app, only_if_stored=True)  # resumes jobs a previous run left unfinished
        except Exception as exc:  # an unusable job store must not keep the server down
            log.error("label studio jobs not started: %s", getattr(exc, "message", None) or repr(exc))
    # Everything built at start-up (apps, routes, pydantic models, protobuf classes) lives for the whole
    # process: moved out of the collector's view, a full collection no longer walks it while requests wait.
    gc.collect()
    gc.freeze()
    log.info("ready", extra={"models": [m.name for m in engine.models()]})

    stopper = asyncio.create_task(stop_event.wait(), name="stop-signal")
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper]
    exit_code = 0
    for task in failed:
        exc = task.exception() if not task.cancelled() else None
        log.error("%s server stopped unexpectedly: %r", task.get_name(), exc)
        exit_code = 1

    log.info("draining: refusing new connections, finishing in-flight requests",
             extra={"drain_timeout_s": settings.drain_timeout_s})
    dataplane.draining = True  # every door's readiness turns false at once, gRPC health included
    # One budget for the whole drain (doors, then the engine), not one per stage: an orchestrator's
    # grace period (terminationGracePeriodSeconds) is sized from drain_timeout_s. The workers then get
    # a few seconds of their own to exit (pool.stop).
    drain_deadline = loop.time() + settings.drain_timeout_s
    for srv in servers:
        srv.should_exit = True
    # gRPC drains beside HTTP, not after it: it stops taking calls now and gets the whole budget.
    grpc_stopped = None if grpc_server is None else asyncio.ensure_future(grpc_server.stop(settings.drain_timeout_s))
    # Just before uvicorn's graceful timeout cancels what still runs, answer uploads still in flight.
    grace = _graceful_timeout_s(settings)
    cutter = loop.call_later(grace - min(1.0, grace / 4), _cut_uploads, servers)
    await asyncio.gather(*tasks, return_exceptions=True)
    cutter.cancel()
    sweeper.cancel()
    if grpc_stopped is not None:
        await grpc_stopped
    if ls_jobs is not None:
        await ls_jobs.stop_jobs(inference_app)  # before the engine: jobs stop where they are and resume next start
    await engine.stop(max(0.0, drain_deadline - loop.time()))
    stopper.cancel()
    log.info("stopped")
    return exit_code


async def _sweep(servers) -> None:
    try:
        from .protocols.rest.limits import sweep_forever
    except ImportError:
        return
    await sweep_forever(servers)


def _cut_uploads(servers) -> None:
    from .protocols.rest.limits import cut_unfinished_uploads

    cut_unfinished_uploads(servers)


def _new_event_loop():
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_server(settings: ServerSettings) -> int:
    from .observability.logging import configure_logging

    configure_logging(settings.log_level)
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        return runner.run(serve(settings))
