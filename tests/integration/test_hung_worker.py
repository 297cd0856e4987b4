"""A frozen (SIGSTOPped) worker process stops counting as live within a few heartbeats, its batch
is retried on the other worker, and it is killed and restarted; alone, readiness turns false."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from fakes import image, running_engine, sample, write_model
from service.engine.dataplane import DataPlane

pytestmark = pytest.mark.integration

BEATS = dict(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5)


async def _until(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_sigstop_one_of_two_workers_fails_over_and_restarts_it(tmp_path):
    write_model(tmp_path, "hang2", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, **BEATS) as engine:
            workers = engine.model_info("hang2").workers
            victim, survivor = workers[0].pid, workers[1].pid
            # Keep the survivor busy so the next request goes to the victim, then freeze the victim mid-batch.
            busy = asyncio.create_task(engine.detect("hang2", [image(b"SLEEP:0.3")]))
            await asyncio.sleep(0.05)
            stuck = asyncio.create_task(engine.detect("hang2", [image(b"SLEEP:0.3")], timeout_s=20))
            await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGSTOP)
            try:
                noticed = await _until(lambda: sample("detserve_live_workers", {"model": "hang2"}) == 1, 3.0)
                assert noticed < 1.2  # a few missed beats, not the 30 s request timeout
                from service.protocols.rest.management import describe

                info = engine.model_info("hang2")  # describe agrees with the metric (it counted it live)
                assert all(not w.responsive for w in info.workers if w.pid == victim)
                assert describe(info)["liveWorkers"] == 1
                assert engine.model_ready("hang2")  # one live worker still serves
                (result,) = await asyncio.wait_for(stuck, 10)  # retried on the survivor
                assert result.image_height == survivor
                await busy
                await _until(lambda: any(w.restarts == 1 and w.state == "ready"
                                         for w in engine.model_info("hang2").workers), 20)
                assert victim not in {w.pid for w in engine.model_info("hang2").workers}
                assert sample("detserve_live_workers", {"model": "hang2"}) == 2
            finally:
                _kill_quietly(victim)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_sigstop_the_only_worker_turns_readiness_false_at_once(tmp_path):
    write_model(tmp_path, "hang1", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False, heartbeat_interval_s=0.2, heartbeat_timeout_s=30) as engine:
            dp = DataPlane(engine)
            victim = engine.model_info("hang1").workers[0].pid
            assert dp.ready()
            os.kill(victim, signal.SIGSTOP)
            try:
                assert await _until(lambda: not dp.ready(), 3.0) < 1.2
                assert not dp.model_ready("hang1") and dp.state() == "not ready"
                os.kill(victim, signal.SIGCONT)  # it answers again before the kill: live again
                await _until(dp.ready, 3.0)
            finally:
                _kill_quietly(victim, cont=True)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def _kill_quietly(pid: int, cont: bool = False) -> None:
    try:
        os.kill(pid, signal.SIGCONT if cont else signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_every_door_reports_a_frozen_only_worker_as_not_ready(tmp_path):
    import grpc
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serve_process import ServeProcess
    from service.protocols.grpc.generated import grpc_service_pb2 as kpb
    from service.protocols.grpc.generated import grpc_service_pb2_grpc as kpb_grpc

    store = tmp_path / "store"
    write_model(store, "frozen", workers=1)
    proc = ServeProcess(store, tmp_path, grpc=True, config="heartbeat_interval_s = 0.2\nheartbeat_timeout_s = 30\n")
    proc.wait_ready()
    victim = httpx.get(f"{proc.mgmt}/models/frozen", timeout=5).json()[0]["workers"][0]["pid"]
    channel = grpc.insecure_channel(proc.grpc_target)
    kserve, health = kpb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)

    def doors() -> dict:
        return {
            "readyz": httpx.get(f"{proc.url}/readyz", timeout=5).status_code,
            "ping": httpx.get(f"{proc.url}/ping", timeout=5).status_code,
            "v2_ready": httpx.get(f"{proc.url}/v2/health/ready", timeout=5).status_code,
            "v2_model_ready": httpx.get(f"{proc.url}/v2/models/frozen/ready", timeout=5).status_code,
            "ServerReady": kserve.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready,
            "health": health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status,
        }

    try:
        ready = {"readyz": 200, "ping": 200, "v2_ready": 200, "v2_model_ready": 200,
                 "ServerReady": True, "health": health_pb2.HealthCheckResponse.SERVING}
        deadline = time.monotonic() + 4  # grpc.health follows readiness on its 0.5 s poll
        while (seen := doors()) != ready:
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        os.kill(victim, signal.SIGSTOP)
        not_ready = {"readyz": 503, "ping": 500, "v2_ready": 503, "v2_model_ready": 503,
                     "ServerReady": False, "health": health_pb2.HealthCheckResponse.NOT_SERVING}
        deadline = time.monotonic() + 4  # 2.5 beats of 0.2 s, the health poll (0.5 s), a loaded box
        while (seen := doors()) != not_ready:
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        os.kill(victim, signal.SIGCONT)
        deadline = time.monotonic() + 4
        while (seen := doors()) != ready:
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
    finally:
        _kill_quietly(victim, cont=True)
        channel.close()
        proc.stop()
