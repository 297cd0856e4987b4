"""The Python client: retry with backoff honouring Retry-After, error mapping, sync wrapper, over a
real in-process gRPC server whose engine is a small scripted fake."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service import errors
from service.client import AsyncDetserveClient, DetserveClient
from service.client.transports import _rest_error
from service.protocols.grpc.server import start_grpc_server
from service.settings import ServerSettings
from service.types import BatchSettings, DetectResult, Detection, ModelInfo


class FlakyEngine:
    """Refuses the first `overloads` detect calls with Overloaded(retry_after_s), then answers."""

    def __init__(self, overloads: int, retry_after_s: float | None = 0.2):
        self.overloads, self.retry_after_s, self.calls = overloads, retry_after_s, 0

    async def detect(self, model, images, options=None, **kwargs):
        self.model_info(model)
        self.calls += 1
        if self.calls <= self.overloads:
            raise errors.Overloaded("queue full", retry_after_s=self.retry_after_s)
        return [DetectResult([Detection(0, "cat", 0.75, (1.0, 2.0, 3.0, 4.0))], 10, 20, model, "toy-1") for _ in images]

    def live(self):
        return True

    def ready(self):
        return True

    def model_ready(self, model):
        return True

    def models(self):
        return [self.model_info("toy")]

    def model_info(self, model):
        if model != "toy":
            raise errors.ModelNotFound(f"model '{model}' is not loaded")
        return ModelInfo("toy", "toy-1", "null", "eager", ("cat",), 320, False, True, BatchSettings())


def _with_server(engine, scenario):
    async def main():
        server = await start_grpc_server(engine, ServerSettings(grpc_address="127.0.0.1", grpc_port=0))
        try:
            return await scenario(f"127.0.0.1:{server.detserve_port}")
        finally:
            await server.stop(None)
    return asyncio.run(main())


def test_retries_overload_waiting_at_least_retry_after():
    engine = FlakyEngine(overloads=2, retry_after_s=0.2)

    async def scenario(target):
        async with AsyncDetserveClient(grpc=target, retries=3, backoff_s=0.01) as client:
            started = time.monotonic()
            result = await client.detect(b"img")
            return result, time.monotonic() - started

    result, elapsed = _with_server(engine, scenario)
    assert engine.calls == 3 and result.detections[0].class_name == "cat" and result.image_height == 20
    assert elapsed >= 0.4  # two waits, each at least the server's Retry-After of 0.2 s


def test_gives_up_after_the_retry_budget():
    engine = FlakyEngine(overloads=10, retry_after_s=None)

    async def scenario(target):
        async with AsyncDetserveClient(grpc=target, retries=2, backoff_s=0.01) as client:
            with pytest.raises(errors.Overloaded):
                await client.detect(b"img")

    _with_server(engine, scenario)
    assert engine.calls == 3


def test_not_found_is_not_retried():
    engine = FlakyEngine(overloads=0)

    async def scenario(target):
        async with AsyncDetserveClient(grpc=target, retries=3) as client:
            with pytest.raises(errors.ModelNotFound):
                await client.detect(b"img", model="nope")
            return (await client.model_info("toy")).classes

    assert _with_server(engine, scenario) == ("cat",)


def test_sync_client_wraps_the_async_one():
    engine = FlakyEngine(overloads=0)

    async def scenario(target):
        # The sync client owns its loop, so drive it from a worker thread.
        def use():
            with DetserveClient(grpc=target, model="toy") as client:
                return client.health(), client.detect_batch([b"a", b"b"]), [m.name for m in client.list_models()]
        return await asyncio.to_thread(use)

    healthy, results, names = _with_server(engine, scenario)
    assert healthy and len(results) == 2 and names == ["toy"]


def test_rest_error_mapping_reads_code_and_retry_after():
    overloaded = _rest_error(httpx.Response(429, json={"code": "overloaded", "message": "full"}, headers={"Retry-After": "3"}))
    assert isinstance(overloaded, errors.Overloaded) and overloaded.retry_after_s == 3.0
    v2 = _rest_error(httpx.Response(404, json={"error": "no model"}))
    assert isinstance(v2, errors.ModelNotFound) and v2.message == "no model"
    assert isinstance(_rest_error(httpx.Response(502, text="bad gateway")), errors.InternalError)


def test_client_needs_exactly_one_endpoint():
    with pytest.raises(ValueError):
        AsyncDetserveClient()
    with pytest.raises(ValueError):
        AsyncDetserveClient("http://x:8080", grpc="x:7070")
