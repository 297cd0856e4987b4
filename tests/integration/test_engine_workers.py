"""The engine with real spawned worker processes (fake predictors steered per image)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from fakes import image, running_engine, sample, write_model
from service import errors

pytestmark = pytest.mark.integration


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def wait_until(predicate, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_concurrent_load_is_batched_across_two_worker_processes(tmp_path):
    write_model(tmp_path, "proc-batch", workers=2, batch={"max_batch_size": 8})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            info = engine.model_info("proc-batch")
            pids = {w.pid for w in info.workers}
            assert len(pids) == 2 and os.getpid() not in pids and info.ready
            results = await asyncio.gather(*(engine.detect("proc-batch", [image(b"SLEEP:0.02")]) for _ in range(64)))
            assert len(results) == 64
            assert max(r[0].image_width for r in results) > 1  # batch size seen inside the worker
            assert {r[0].image_height for r in results} <= pids  # ran in the worker processes
            assert sample("detserve_batch_size_count", {"model": "proc-batch"}) < 64
            assert sample("detserve_live_workers", {"model": "proc-batch"}) == 2

    run(scenario())


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_start_from_the_forkserver_with_the_fronts_environment(tmp_path, monkeypatch, method):
    # The forkserver may have started in an earlier test, with an older environment: a variable set now
    # must still reach a worker forked from it. Its workers share one parent and arrive with torch
    # imported (the fake predictor never imports it); spawned ones are the front's children, without.
    from service.engine.process import worker_context

    worker_context(method)
    monkeypatch.setenv("DSMARK", f"set-after-{method}")
    write_model(tmp_path, "proc-env", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method=method) as engine:
            replies = await asyncio.gather(*(engine.detect("proc-env", [image(b"ENV:DSMARK")])
                                             for _ in range(8)))
            answers = {(r[0].image_width, r[0].image_height, r[0].model_version) for r in replies}
            parents = {parent for parent, _, _ in answers}
            assert {version for _, _, version in answers} == {
                f"set-after-{method} torch={method == 'forkserver'}"}
            assert len({pid for _, pid, _ in answers}) == 2  # both workers answered
            assert len(parents) == 1
            assert (parents == {os.getpid()}) == (method == "spawn")

    run(scenario())


def test_a_worker_restarts_after_the_forkserver_itself_was_killed(tmp_path):
    # An OOM kill takes the forkserver (it holds torch's pages): the next restart starts a new one.
    write_model(tmp_path, "proc-fsdead", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method="forkserver") as engine:
            reply = await engine.detect("proc-fsdead", [image(b"ENV:HOME")])
            old_forkserver, victim = reply[0].image_width, reply[0].image_height
            os.kill(old_forkserver, signal.SIGKILL)
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: all(w.state == "ready" and w.pid not in (None, victim)
                                         for w in engine.model_info("proc-fsdead").workers))
            replies = await asyncio.gather(*(engine.detect("proc-fsdead", [image(b"ENV:HOME")]) for _ in range(6)))
            parents = {r[0].image_width for r in replies}
            assert old_forkserver not in parents and os.getpid() not in parents
            assert sum(w.restarts for w in engine.model_info("proc-fsdead").workers) == 1

    run(scenario())


def _state(pid: int) -> str:
    """A process's state letter ("T" stopped, "Z" zombie), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_a_hung_worker_is_killed_even_after_its_forkserver_died(tmp_path):
    # Once the forkserver dies, multiprocessing marks every worker it forked as exited at the next
    # start, and Process.kill() then sends nothing: a hung one stayed stopped, its seat busy, forever.
    write_model(tmp_path, "proc-orphan", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method="forkserver",
                                  heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0) as engine:
            workers = lambda: engine.model_info("proc-orphan").workers  # noqa: E731
            reply = await engine.detect("proc-orphan", [image(b"ENV:HOME")])
            forkserver = reply[0].image_width
            first, second = (w.pid for w in workers())
            os.kill(forkserver, signal.SIGKILL)
            os.kill(first, signal.SIGKILL)  # its restart starts a new forkserver (and a Process.start())
            await wait_until(lambda: sum(w.restarts for w in workers()) == 1
                             and all(w.state == "ready" and w.pid != first for w in workers()))
            os.kill(second, signal.SIGSTOP)
            try:
                await wait_until(lambda: _state(second) in ("gone", "Z"))
                await wait_until(lambda: sum(w.restarts for w in workers()) == 2
                                 and all(w.state == "ready" and w.pid not in (first, second) for w in workers()))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(second, signal.SIGKILL)
            assert len(await asyncio.gather(*(engine.detect("proc-orphan", [image(b"ok")]) for _ in range(4)))) == 4

    run(scenario())


def test_a_stopped_forkserver_is_replaced_and_the_dead_worker_restarted(tmp_path, monkeypatch):
    # The exit status of a worker comes through the forkserver, and a restart's probe waits for it:
    # stopped (SIGSTOP, swapped out), it used to stall every restart and scale call for good.
    from service.engine import process

    monkeypatch.setattr(process, "PROBE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(process, "EXIT_STATUS_WAIT_S", 0.5)
    write_model(tmp_path, "proc-fsstop", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method="forkserver") as engine:
            reply = await engine.detect("proc-fsstop", [image(b"ENV:HOME")])
            forkserver, victim = reply[0].image_width, reply[0].image_height
            os.kill(forkserver, signal.SIGSTOP)
            try:
                os.kill(victim, signal.SIGKILL)
                worker = lambda: engine.model_info("proc-fsstop").workers[0]  # noqa: E731
                await wait_until(lambda: worker().state == "ready" and worker().pid not in (None, victim), 30)
                assert _state(forkserver) in ("gone", "Z")  # killed as hung, not left stopped
                reply = await engine.detect("proc-fsstop", [image(b"ENV:HOME")])
                assert reply[0].image_width not in (forkserver, os.getpid())  # forked by a new forkserver
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(forkserver, signal.SIGKILL)

    run(scenario())


def test_scaling_to_zero_answers_the_queue_at_once(tmp_path):
    write_model(tmp_path, "proc-zero", workers=1, batch={"max_batch_size": 1, "request_timeout_ms": 60000})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            running = asyncio.ensure_future(engine.detect("proc-zero", [image(b"SLEEP:1")]))
            await wait_until(lambda: engine.model_info("proc-zero").workers[0].state == "busy")
            queued = [asyncio.ensure_future(engine.detect("proc-zero", [image(b"ok")])) for _ in range(3)]
            await wait_until(lambda: engine.model_info("proc-zero").queue_depth == 3)
            await engine.scale_workers("proc-zero", 0)
            outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 10)
            assert all(isinstance(o, errors.ModelNotReady) and "scaled to 0" in o.message for o in outcomes)
            assert len(await running) == 1  # the batch it was running finishes first

    run(scenario(), 30)


def test_a_worker_that_cannot_be_launched_is_retried_not_left_starting(tmp_path, monkeypatch):
    from service.engine import pool

    launches = {"n": 0}
    real = pool.WorkerProcess

    def flaky(*args, **kwargs):
        launches["n"] += 1
        if launches["n"] == 2:  # the first restart
            raise OSError("cannot connect to the forkserver (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "WorkerProcess", flaky)
    write_model(tmp_path, "proc-flaky", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            victim = engine.model_info("proc-flaky").workers[0].pid
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: engine.model_info("proc-flaky").workers[0].state == "ready"
                             and engine.model_info("proc-flaky").workers[0].pid not in (None, victim))
            assert launches["n"] == 3
            assert engine.model_info("proc-flaky").workers[0].restarts == 2
            assert len(await engine.detect("proc-flaky", [image(b"ok")])) == 1

    run(scenario())


def test_workers_are_spawned_when_the_forkserver_cannot_start(tmp_path, monkeypatch, caplog):
    from multiprocessing import forkserver

    from service.engine import process

    def no_socket():
        raise OSError("no writable temporary folder (test)")

    monkeypatch.setattr(process, "_contexts", {})
    monkeypatch.setattr(forkserver._forkserver, "ensure_running", no_socket)
    write_model(tmp_path, "proc-fallback", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method="forkserver") as engine:
            reply = await engine.detect("proc-fallback", [image(b"ENV:HOME")])
            assert reply[0].image_width == os.getpid()  # the front's own child: spawned
            assert reply[0].model_version.endswith("torch=False")

    run(scenario())
    assert "cannot start the worker forkserver (no writable temporary folder (test))" in caplog.text


def test_a_sigterm_to_the_forkserver_neither_ends_it_nor_looks_like_dead_workers(tmp_path):
    # systemd and `kill -- -PGID` signal the whole group while the front drains: the forkserver must
    # stay, or every restart during the drain would first wait for a new one to import torch.
    write_model(tmp_path, "proc-term", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, worker_start_method="forkserver") as engine:
            reply = await engine.detect("proc-term", [image(b"ENV:HOME")])
            forkserver = reply[0].image_width
            assert forkserver != os.getpid()
            os.kill(forkserver, signal.SIGTERM)
            await asyncio.sleep(0.5)
            state = Path(f"/proc/{forkserver}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state != "Z"  # alive, not a zombie the front has yet to reap
            info = engine.model_info("proc-term")
            assert info.ready and [w.restarts for w in info.workers] == [0, 0]
            assert len(await engine.detect("proc-term", [image(b"ok")])) == 1

    run(scenario())


@pytest.mark.parametrize("elastic", [True, False])
def test_an_elastic_worker_takes_every_core_only_while_the_other_is_idle(tmp_path, monkeypatch, elastic):
    # Two workers on a (pretended) 4-core machine: a share of 2 threads each, 4 for a batch that starts
    # while the other worker is idle. The fake answers THREADS with the width its worker last set; the
    # padding sends the image through the shared-memory arena, which rebuilds the request.
    monkeypatch.setattr("service.settings.available_cores", lambda *a: 4)
    toml = write_model(tmp_path, "elastic", workers=2, batch={"max_batch_size": 1}) / "model.toml"
    toml.write_text(toml.read_text().replace("count = 2", f"count = 2\nelastic = {str(elastic).lower()}"))

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            threads = image(b"THREADS" + bytes(64 << 10))
            alone = await engine.detect("elastic", [threads])
            busy = asyncio.ensure_future(engine.detect("elastic", [image(b"SLEEP:1.5")]))
            await wait_until(lambda: any(w.in_flight for w in engine.model_info("elastic").workers))
            beside = await engine.detect("elastic", [threads])
            await busy
            again = await engine.detect("elastic", [threads])
            return alone[0].model_version, beside[0].model_version, again[0].model_version

    wide = "threads=4" if elastic else "threads=2"
    assert run(scenario()) == (wide, "threads=2", wide)


def test_sigkill_under_load_recovers_and_no_request_hangs(tmp_path):
    write_model(tmp_path, "proc-kill", workers=2, batch={"max_batch_size": 4})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            victim = engine.model_info("proc-kill").workers[0].pid
            load = [asyncio.create_task(engine.detect("proc-kill", [image(b"SLEEP:0.05")])) for _ in range(40)]
            await asyncio.sleep(0.15)
            os.kill(victim, signal.SIGKILL)
            outcomes = await asyncio.wait_for(asyncio.gather(*load, return_exceptions=True), 30)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            assert all(isinstance(f, errors.WorkerDied) for f in failures), failures
            assert len(failures) < 40  # retried on the surviving worker
            await wait_until(lambda: engine.model_info("proc-kill").workers[0].state == "ready")
            info = engine.model_info("proc-kill")
            assert info.workers[0].restarts == 1 and info.workers[0].pid != victim
            assert sample("detserve_worker_restarts_total", {"model": "proc-kill"}) == 1
            assert len(await engine.detect("proc-kill", [image(b"ok")])) == 1

    run(scenario())


def test_an_image_that_kills_its_worker_fails_fast_after_one_retry(tmp_path):
    write_model(tmp_path, "proc-crash", workers=2, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            with pytest.raises(errors.WorkerDied):
                await engine.detect("proc-crash", [image(b"CRASH")])
            await wait_until(lambda: engine.model_ready("proc-crash")
                             and all(w.state == "ready" for w in engine.model_info("proc-crash").workers))
            assert sum(w.restarts for w in engine.model_info("proc-crash").workers) == 2  # ran twice, no more
            assert len(await engine.detect("proc-crash", [image(b"ok")])) == 1

    run(scenario())


def test_a_hung_worker_is_killed_and_its_request_answered(tmp_path):
    write_model(tmp_path, "proc-hang", workers=1, batch={"max_batch_size": 1, "request_timeout_ms": 2000})

    async def scenario():
        async with running_engine(tmp_path, inline=False, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0) as engine:
            with pytest.raises((errors.WorkerDied, errors.DeadlineExceeded)):
                await engine.detect("proc-hang", [image(b"HANG")])
            # Heartbeats still flow (the predictor sleeps): a batch outliving the model's
            # request_timeout_ms is the tell.
            await wait_until(lambda: engine.model_ready("proc-hang")
                             and engine.model_info("proc-hang").workers[0].restarts >= 1)
            assert len(await engine.detect("proc-hang", [image(b"ok")])) == 1

    run(scenario())


def test_a_client_deadline_shorter_than_the_batch_does_not_kill_the_worker(tmp_path):
    write_model(tmp_path, "proc-slow", workers=1, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=False, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0) as engine:
            with pytest.raises(errors.DeadlineExceeded):
                await engine.detect("proc-slow", [image(b"SLEEP:2.5")], timeout_s=0.2)
            await asyncio.sleep(3.0)  # the batch finishes on a worker that was never hung
            assert engine.model_info("proc-slow").workers[0].restarts == 0
            assert len(await engine.detect("proc-slow", [image(b"ok")])) == 1

    run(scenario())


def test_a_stalled_event_loop_is_not_blamed_on_the_workers(tmp_path):
    """Beats sent while the front's loop was blocked sit unread in the pipes; the supervisor's first
    wake-up after the stall must not take that for silence and kill healthy workers."""
    write_model(tmp_path, "proc-stall", workers=2)

    async def scenario():
        async with running_engine(tmp_path, inline=False, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0) as engine:
            # A stall inside an I/O callback, as a request handler woken by its body runs: the
            # supervisor's next wake-up then comes before the pipes are read again. Whether a beat
            # was read just before depends on timing, so the stall is repeated.
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair()
            loop.add_reader(ours, lambda: (ours.recv(1), time.sleep(1.5)))
            try:
                for _ in range(5):
                    theirs.send(b"x")
                    await asyncio.sleep(2.0)
            finally:
                loop.remove_reader(ours)
                ours.close()
                theirs.close()
            await asyncio.sleep(1.5)
            assert [w.restarts for w in engine.model_info("proc-stall").workers] == [0, 0]
            assert len(await engine.detect("proc-stall", [image(b"ok")])) == 1

    # uvloop, as `detserve serve` runs: it wakes timers before it polls the pipes.
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def test_queue_full_and_expiry_with_worker_processes(tmp_path):
    write_model(tmp_path, "proc-limits", workers=1, batch={"max_batch_size": 1, "max_queue_size": 2})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            running = asyncio.create_task(engine.detect("proc-limits", [image(b"SLEEP:0.5")]))
            await asyncio.sleep(0.1)
            expiring = asyncio.create_task(engine.detect("proc-limits", [image(b"ok")], timeout_s=0.1))
            queued = asyncio.create_task(engine.detect("proc-limits", [image(b"ok")]))
            await asyncio.sleep(0.01)
            with pytest.raises(errors.Overloaded):
                await engine.detect("proc-limits", [image(b"ok")])
            with pytest.raises(errors.DeadlineExceeded):
                await expiring
            assert len(await running) == 1 and len(await queued) == 1

    run(scenario())


def test_scale_up_and_down_with_processes(tmp_path):
    write_model(tmp_path, "proc-scale", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            info = await engine.scale_workers("proc-scale", 2)
            assert [w.state for w in info.workers] == ["ready", "ready"]
            pids = [w.pid for w in info.workers]
            await engine.scale_workers("proc-scale", 1)
            await wait_until(lambda: len(engine.model_info("proc-scale").workers) == 1)
            assert engine.model_info("proc-scale").workers[0].restarts == 0  # a retire is not a restart
            assert sample("detserve_worker_restarts_total", {"model": "proc-scale"}) == 0
            assert len(await engine.detect("proc-scale", [image(b"ok")])) == 1
            await wait_until(lambda: not _alive(pids[1]))

    run(scenario())


def test_unload_drains_in_flight_requests(tmp_path):
    write_model(tmp_path, "proc-unload", workers=1, batch={"max_batch_size": 2})

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            pid = engine.model_info("proc-unload").workers[0].pid
            accepted = [asyncio.create_task(engine.detect("proc-unload", [image(b"SLEEP:0.1")])) for _ in range(5)]
            await asyncio.sleep(0.05)
            await engine.unload_model("proc-unload")
            assert [len(r) for r in await asyncio.gather(*accepted)] == [1] * 5
            assert "proc-unload" not in [m.name for m in engine.models()]
            await wait_until(lambda: not _alive(pid))

    run(scenario())


def test_a_worker_that_cannot_load_its_model_fails_start_with_config_error(tmp_path):
    write_model(tmp_path, "proc-broken", workers=1)

    async def scenario():
        with pytest.raises(errors.ConfigError, match="weights.pth"):
            async with running_engine(tmp_path, inline=False, factory_kwargs={"fail_load": True}):
                pass

    run(scenario())


def test_load_stages_each_get_the_whole_start_timeout(tmp_path):
    """A long auto load (export, parity, a TensorRT build) reports each stage and is not killed for
    taking longer than worker_start_timeout_s in total; a stage that alone overruns still fails."""
    write_model(tmp_path, "proc-stages", workers=1)

    async def scenario(delay_s: float, stages: int):
        async with running_engine(tmp_path, inline=False, worker_start_timeout_s=6.0, heartbeat_timeout_s=1.0,
                                  heartbeat_interval_s=0.2,
                                  factory_kwargs={"load_delay_s": delay_s, "load_stages": stages}) as engine:
            return await engine.detect("proc-stages", [image(b"ok")])

    # 10 s in all, 2.5 s between reports (the first right after the worker's imports, which a busy
    # machine may stretch to seconds)
    assert run(scenario(2.5, 4))[0].image_width == 1
    with pytest.raises(errors.ConfigError, match="not ready within"):
        run(scenario(8.0, 0))  # one silent stage longer than the timeout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once it is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_ipc_round_trip_of_a_200_kb_image(tmp_path):
    """Prints the per-request IPC cost (process vs inline) and bounds it loosely."""
    import statistics
    import time

    write_model(tmp_path, "proc-ipc", workers=1)
    payload = image(b"ok" + os.urandom(200_000))

    async def median_round_trip(inline: bool) -> float:
        async with running_engine(tmp_path, inline=inline) as engine:
            for _ in range(20):
                await engine.detect("proc-ipc", [payload])
            times = []
            for _ in range(200):
                started = time.perf_counter()
                await engine.detect("proc-ipc", [payload])
                times.append(time.perf_counter() - started)
            return statistics.median(times)

    process_s = run(median_round_trip(False))
    inline_s = run(median_round_trip(True))
    print(f"\n200 KB round trip: process {process_s * 1e3:.2f} ms, inline {inline_s * 1e3:.2f} ms, "
          f"IPC {max(0.0, process_s - inline_s) * 1e3:.2f} ms")
    assert process_s < 0.05


def test_payloads_of_every_size_reach_the_worker_intact(tmp_path):
    """Large images go through the shared-memory arena, small ones and overflow inline (arena.py)."""
    import hashlib

    write_model(tmp_path, "proc-bytes", workers=1, batch={"max_batch_size": 8, "max_batch_delay_ms": 50})
    sizes = [10, 20_000, 300_000, 3_000_000, 20_000_000, 30_000_000, 5_000, 1_000_000]  # 54 MB + 1 MB + ...
    bodies = [b"DIGEST" + os.urandom(n) for n in sizes]

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            for _ in range(2):  # the second round reuses the arena after the first batch's answer
                results = await asyncio.gather(*(engine.detect("proc-bytes", [image(b)]) for b in bodies))
                assert [r[0].model_version for r in results] == [hashlib.sha256(b).hexdigest() for b in bodies]
                assert [r[0].image_width for r in results] == [len(b) for b in bodies]

    run(scenario(), timeout_s=120)


@pytest.mark.parametrize("warmup", [True, False])
def test_a_worker_warms_up_with_one_full_batch_before_it_is_ready(tmp_path, warmup, caplog):
    import logging

    write_model(tmp_path, "warm", batch={"max_batch_size": 4})
    toml = tmp_path / "warm" / "model.toml"
    toml.write_text(toml.read_text().replace("[workers]\n", f"[workers]\nwarmup = {str(warmup).lower()}\n"))
    calls = tmp_path / "calls.txt"
    calls.touch()

    async def scenario():
        caplog.set_level(logging.INFO, logger="detserve.engine")
        # oom_above=2: the warm-up batch of 4 runs out of (fake) CUDA memory and is split, as a real batch would be
        async with running_engine(tmp_path, inline=False,
                                  factory_kwargs={"record_to": str(calls), "oom_above": 2}) as engine:
            assert engine.model_info("warm").ready
            before = calls.read_text().splitlines()
            await engine.detect("warm", [image(b"ok")])
            return before

    before = run(scenario())
    if warmup:
        # one image, then the batch of 4, split in two by the out-of-memory
        assert before == ["RawImage:64x64"] * 2 + ["RawImage:64x64 " * 3 + "RawImage:64x64"] + ["RawImage:64x64 RawImage:64x64"] * 2
        assert "warming up: 4 blank 64x64 image(s)" in caplog.text and "warmed up in" in caplog.text
    else:
        assert before == [] and "warming up" not in caplog.text and "warmed up" not in caplog.text


def test_a_slow_warm_up_skips_its_batch_instead_of_failing_the_start(tmp_path, caplog):
    import logging

    write_model(tmp_path, "slow-warm", batch={"max_batch_size": 16})
    calls = tmp_path / "calls.txt"
    calls.touch()

    async def scenario():
        caplog.set_level(logging.INFO, logger="detserve.engine")
        # 0.4 s a blank image: a batch of 16 would be 6.4 s, past the 4 s start-up timeout
        async with running_engine(tmp_path, inline=False, worker_start_timeout_s=4.0,
                                  factory_kwargs={"record_to": str(calls), "raw_delay_s": 0.4}) as engine:
            assert engine.model_info("slow-warm").ready
            (result,) = await engine.detect("slow-warm", [image(b"ok")])
            return result

    assert run(scenario()).model_version == "slow-warm-fake"
    assert calls.read_text().splitlines()[:3] == ["RawImage:64x64"] * 2 + ["EncodedImage:-x-"]  # no batch of 16: the request next
    assert "so no batch of 16" in caplog.text


def test_workers_started_by_a_request_do_not_log_with_its_request_id(tmp_path):
    # The callbacks a launch registers copy the context they are registered in: without a fresh
    # one, every later line about that worker (its restarts too) carried the scale call's id.
    from service.observability.logging import request_id_var

    write_model(tmp_path, "proc-ctx", workers=1)
    seen: list[str | None] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            if "proc-ctx" in record.getMessage():
                seen.append(request_id_var.get())

    handler = Recorder()
    logging.getLogger("detserve.engine").addHandler(handler)

    async def scenario():
        async with running_engine(tmp_path, inline=False) as engine:
            token = request_id_var.set("scale-call-id")
            try:
                await engine.scale_workers("proc-ctx", 2)
            finally:
                request_id_var.reset(token)
            victim = max(engine.model_info("proc-ctx").workers, key=lambda w: w.worker_id).pid
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: sum(w.restarts for w in engine.model_info("proc-ctx").workers) == 1
                             and all(w.state == "ready" for w in engine.model_info("proc-ctx").workers))

    try:
        run(scenario())
    finally:
        logging.getLogger("detserve.engine").removeHandler(handler)
    assert seen and "scale-call-id" not in seen
