"""The engine in inline mode: the real Scheduler, dispatcher and batch code, predictors in threads."""
from __future__ import annotations

import asyncio

import pytest

from fakes import FakePredictor, image, running_engine, sample, write_model
from service import errors
from service.types import Protocol


def run(coro, timeout_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def test_detect_returns_one_result_per_image_in_order(tmp_path):
    write_model(tmp_path, "inl-order", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            assert engine.ready() and engine.model_ready("inl-order")
            results = await engine.detect("inl-order", [image(b"ok1"), image(b"ok2"), image(b"ok3")])
            assert len(results) == 3 and all(r.model_name == "inl-order" for r in results)
            info = engine.model_info("inl-order")
            assert info.version == "inl-order-fake" and info.classes == ("a", "b") and info.ready
            assert [w.state for w in info.workers] == ["ready"]

    run(scenario())


def test_unknown_model_is_model_not_found(tmp_path):
    write_model(tmp_path, "inl-known")

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            with pytest.raises(errors.ModelNotFound):
                await engine.detect("nope", [image(b"ok")])
            with pytest.raises(errors.ModelNotFound):
                engine.model_info("nope")
            with pytest.raises(errors.ModelNotFound):
                await engine.load_model("nope")

    run(scenario())


def test_concurrent_requests_are_batched(tmp_path):
    write_model(tmp_path, "inl-batch", workers=1, batch={"max_batch_size": 8})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            results = await asyncio.gather(*(engine.detect("inl-batch", [image(b"SLEEP:0.02")]) for _ in range(40)))
            batch_sizes = [r[0].image_width for r in results]
            assert max(batch_sizes) > 1 and max(batch_sizes) <= 8
            assert sample("detserve_batch_size_count", {"model": "inl-batch"}) < 40
            assert sample("detserve_batch_items_total", {"model": "inl-batch", "protocol": "rest", "batch_mix": "rest"}) == 40

    run(scenario())


def test_mixed_doors_share_a_batch(tmp_path):
    write_model(tmp_path, "inl-mix", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            blocker = asyncio.create_task(engine.detect("inl-mix", [image(b"SLEEP:0.2")]))
            await asyncio.sleep(0.05)
            await asyncio.gather(engine.detect("inl-mix", [image(b"ok")], protocol=Protocol.GRPC),
                                 engine.detect("inl-mix", [image(b"ok")], protocol=Protocol.REST))
            await blocker
            assert sample("detserve_batch_items_total", {"model": "inl-mix", "protocol": "grpc", "batch_mix": "mixed"}) == 1

    run(scenario())


def test_a_bad_image_fails_only_its_request(tmp_path):
    write_model(tmp_path, "inl-bad", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            blocker = asyncio.create_task(engine.detect("inl-bad", [image(b"SLEEP:0.2")]))
            await asyncio.sleep(0.05)
            outcomes = await asyncio.gather(engine.detect("inl-bad", [image(b"BAD")]),
                                            engine.detect("inl-bad", [image(b"RAISE")]),
                                            engine.detect("inl-bad", [image(b"ok")]), return_exceptions=True)
            await blocker
            assert isinstance(outcomes[0], errors.InvalidImage)
            assert isinstance(outcomes[1], errors.InternalError) and "exploded" in str(outcomes[1])
            assert isinstance(outcomes[2], list)  # its batch-mate raised; it was rerun alone
            # A multi-image request fails with its first failing image's error, never a partial list.
            with pytest.raises(errors.InvalidImage):
                await engine.detect("inl-bad", [image(b"ok"), image(b"BAD")])

    run(scenario())


def test_full_queue_is_overloaded_immediately(tmp_path):
    write_model(tmp_path, "inl-full", workers=1, batch={"max_batch_size": 1, "max_queue_size": 2})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            busy = [asyncio.create_task(engine.detect("inl-full", [image(b"SLEEP:0.3")]))]
            await asyncio.sleep(0.05)  # running
            busy += [asyncio.create_task(engine.detect("inl-full", [image(b"SLEEP:0.01")])) for _ in range(2)]
            await asyncio.sleep(0.01)  # queued behind it
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(errors.Overloaded) as err:
                await engine.detect("inl-full", [image(b"ok")])
            assert loop.time() - started < 0.05
            assert err.value.retry_after_s >= 1
            await asyncio.gather(*busy)
            assert sample("detserve_rejected_total", {"model": "inl-full", "reason": "queue_full"}) == 1

    run(scenario())


def test_expired_requests_get_deadline_exceeded_and_never_run(tmp_path):
    write_model(tmp_path, "inl-expire", workers=1, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            FakePredictor.seen.clear()
            blocker = asyncio.create_task(engine.detect("inl-expire", [image(b"SLEEP:0.3")]))
            await asyncio.sleep(0.05)
            with pytest.raises(errors.DeadlineExceeded):
                await engine.detect("inl-expire", [image(b"EXPIRED-1")], timeout_s=0.05)
            await blocker
            await engine.detect("inl-expire", [image(b"ok-after")])
            assert not any(c.startswith(b"EXPIRED") for c in FakePredictor.seen)
            assert b"ok-after" in FakePredictor.seen

    run(scenario())


def test_batch_delay_holds_a_lone_request_no_longer_than_the_delay(tmp_path):
    write_model(tmp_path, "inl-delay", workers=1, batch={"max_batch_size": 4, "max_batch_delay_ms": 100})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await engine.detect("inl-delay", [image(b"ok")])
            waited = loop.time() - started
            assert 0.09 <= waited < 1.0
            results = await asyncio.gather(*(engine.detect("inl-delay", [image(b"ok")]) for _ in range(4)))
            assert {r[0].image_width for r in results} == {4}  # a full batch leaves before the delay

    run(scenario())


def test_cuda_oom_splits_the_batch_before_failing_anything(tmp_path):
    pytest.importorskip("torch")
    write_model(tmp_path, "inl-oom", workers=1, batch={"max_batch_size": 8})

    async def scenario():
        async with running_engine(tmp_path, inline=True, factory_kwargs={"oom_above": 2}) as engine:
            results = await engine.detect("inl-oom", [image(b"ok")] * 8)
            assert len(results) == 8
            assert all(r.image_width <= 2 for r in results)
            assert sample("detserve_oom_batch_splits_total", {"model": "inl-oom"}) == 3  # 8 -> 4+4 -> 2+2+2+2

    run(scenario())


def test_runtime_batch_settings_are_validated_and_applied(tmp_path):
    write_model(tmp_path, "inl-settings", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            info = await engine.set_batch_settings("inl-settings", max_batch_size=2, max_batch_delay_ms=5)
            assert info.batch.max_batch_size == 2 and info.batch.max_batch_delay_ms == 5
            with pytest.raises(errors.InvalidRequest):
                await engine.set_batch_settings("inl-settings", max_batch_size=0)
            for bad in (dict(request_timeout_ms=float("inf")), dict(request_timeout_ms=float("nan")),
                        dict(max_queue_size=10**12)):
                with pytest.raises(errors.InvalidRequest, match=next(iter(bad))):
                    await engine.set_batch_settings("inl-settings", **bad)
            results = await asyncio.gather(*(engine.detect("inl-settings", [image(b"SLEEP:0.01")]) for _ in range(10)))
            assert max(r[0].image_width for r in results) <= 2

    run(scenario())


def test_racing_scale_calls_run_in_order_and_both_succeed(tmp_path):
    write_model(tmp_path, "inl-race", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True, factory_kwargs={"load_delay_s": 0.3}) as engine:
            up = asyncio.create_task(engine.scale_workers("inl-race", 3))
            await asyncio.sleep(0.05)  # the two new workers are loading
            down = asyncio.create_task(engine.scale_workers("inl-race", 1))
            await asyncio.gather(up, down)  # neither fails with a false "not ready"
            await asyncio.sleep(0.05)
            assert len(engine.model_info("inl-race").workers) == 1 and engine.model_ready("inl-race")

    run(scenario())


def test_scale_unload_and_load_at_runtime(tmp_path):
    write_model(tmp_path, "inl-scale", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            info = await engine.scale_workers("inl-scale", 3)
            assert [w.state for w in info.workers] == ["ready"] * 3
            info = await engine.scale_workers("inl-scale", 0)
            await asyncio.sleep(0.05)
            assert engine.model_info("inl-scale").workers == () and not engine.model_ready("inl-scale")
            with pytest.raises(errors.ModelNotReady):  # 503 at once, not a 504 after the timeout
                await engine.detect("inl-scale", [image(b"ok")])
            info = await engine.scale_workers("inl-scale", 1)
            assert len(info.workers) == 1 and engine.model_ready("inl-scale")
            running = [asyncio.create_task(engine.detect("inl-scale", [image(b"SLEEP:0.1")])) for _ in range(5)]
            await asyncio.sleep(0.02)
            await engine.unload_model("inl-scale")  # drains first
            assert [len(r) for r in await asyncio.gather(*running)] == [1] * len(running)
            with pytest.raises(errors.ModelNotFound):
                await engine.detect("inl-scale", [image(b"ok")])
            info = await engine.load_model("inl-scale", workers=2)
            assert info.ready and len(info.workers) == 2
            await engine.detect("inl-scale", [image(b"ok")])

    run(scenario())


def test_stop_finishes_accepted_work_and_refuses_new(tmp_path):
    write_model(tmp_path, "inl-stop", workers=1, batch={"max_batch_size": 2})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            accepted = [asyncio.create_task(engine.detect("inl-stop", [image(b"SLEEP:0.05")])) for _ in range(6)]
            await asyncio.sleep(0.01)
            stopping = asyncio.create_task(engine.stop(5.0))
            await asyncio.sleep(0)
            with pytest.raises(errors.ModelNotReady):
                await engine.detect("inl-stop", [image(b"ok")])
            await stopping
            assert [len(r) for r in await asyncio.gather(*accepted)] == [1] * len(accepted)
            assert not engine.ready() and not engine.live()
            with pytest.raises(errors.ModelNotReady):
                await engine.detect("inl-stop", [image(b"ok")])

    run(scenario())


def test_a_model_that_fails_to_load_is_a_config_error(tmp_path):
    write_model(tmp_path, "inl-broken", workers=1)

    async def scenario():
        with pytest.raises(errors.ConfigError, match="failed to load"):
            async with running_engine(tmp_path, inline=True, factory_kwargs={"fail_load": True}):
                pass

    run(scenario())


def test_a_client_timeout_never_outlives_the_models_request_timeout(tmp_path):
    """The deadline also bounds how long a stuck batch may hold a worker: a client's huge timeout is capped."""
    write_model(tmp_path, "capped", batch={"request_timeout_ms": 300})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(errors.DeadlineExceeded):
                await engine.detect("capped", [image(b"SLEEP:2")], timeout_s=1e12)
            assert loop.time() - started < 1.5
            with pytest.raises(errors.InvalidRequest):
                await engine.detect("capped", [image(b"ok")], timeout_s=0)

    run(scenario())


def test_a_request_whose_caller_gives_up_or_times_out_is_never_run(tmp_path):
    """One image or several, a request abandoned while queued (cancelled or past its deadline) never
    reaches the predictor, and the next request is served."""
    write_model(tmp_path, "inl-gone", workers=1, batch={"max_batch_size": 1})

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            FakePredictor.seen.clear()
            blocker = asyncio.create_task(engine.detect("inl-gone", [image(b"SLEEP:0.3")]))
            await asyncio.sleep(0.05)
            cancelled = asyncio.create_task(engine.detect("inl-gone", [image(b"GONE-cancelled")]))
            await asyncio.sleep(0.02)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            with pytest.raises(errors.DeadlineExceeded):
                await engine.detect("inl-gone", [image(b"GONE-a"), image(b"GONE-b")], timeout_s=0.05)
            await blocker
            assert [r.model_name for r in await engine.detect("inl-gone", [image(b"ok"), image(b"ok2")])] == [
                "inl-gone", "inl-gone"]
            assert not any(c.startswith(b"GONE") for c in FakePredictor.seen)

    run(scenario())


def test_whole_images_of_a_keep_ratio_model_carry_their_padded_shape_to_the_scheduler(tmp_path, monkeypatch):
    """The front reads each image header for the scheduler's shape groups (two-stage models batch
    images of one padded shape together); a square-input model's items carry no key."""
    from fakes import png_bytes
    from service.engine.scheduler import Scheduler
    from service.types import EncodedImage

    write_model(tmp_path, "inl-keep-ratio", extra="resize_scale = [1333, 800]")
    write_model(tmp_path, "inl-square")
    # The family's default scale, as the worker reports it: the file names none.
    write_model(tmp_path, "inl-two-stage", arch="faster-rcnn-r50-fpn", extra='weights = "w.pth"')
    write_model(tmp_path, "inl-rtmdet", arch="rtmdet-tiny", extra='weights = "w.pth"\nresize_scale = [1333, 800]')
    seen = []
    real_add_all = Scheduler.add_all
    monkeypatch.setattr(Scheduler, "add_all", lambda self, items: (seen.extend(items), real_add_all(self, items))[1])
    landscape, portrait = EncodedImage(png_bytes(640, 480, (1, 1, 5, 5))), EncodedImage(png_bytes(480, 640, (1, 1, 5, 5)))

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            await engine.detect("inl-keep-ratio", [landscape, portrait, EncodedImage(b"not an image")])
            await engine.detect("inl-square", [landscape])
            await engine.detect("inl-two-stage", [landscape, portrait])
            await engine.detect("inl-rtmdet", [landscape])  # square input: its resize_scale means nothing

    run(scenario())
    # 640x480 -> 1067x800 -> padded 800x1088; 480x640 -> 800x1067 -> 1088x800; unreadable: no key
    assert [item.shape_key for item in seen] == [(800, 1088), (1088, 800), None, None, (800, 1088), (1088, 800),
                                                 None]


def test_unregistering_a_model_while_it_loads_is_a_conflict_for_the_load(tmp_path):
    write_model(tmp_path, "inl-unreg", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=True, factory_kwargs={"load_delay_s": 0.5}) as engine:
            await engine.unload_model("inl-unreg")
            loading = asyncio.create_task(engine.load_model("inl-unreg"))
            await asyncio.sleep(0.1)  # its worker is loading
            await engine.unload_model("inl-unreg")
            with pytest.raises(errors.Conflict, match="unregistered while it was being loaded"):
                await loading
            assert [m.name for m in engine.models()] == []
            info = await engine.load_model("inl-unreg")  # and it can be loaded again
            assert info.ready
            with pytest.raises(errors.Conflict, match="already loaded"):
                await engine.load_model("inl-unreg")
            assert errors.http_status(errors.Conflict("x")) == 409

    run(scenario())


def test_a_crashed_inline_batch_closes_its_predictor_and_the_seat_reloads(tmp_path, monkeypatch):
    """A thread worker has no process exit to free its model: the pool closes the predictor itself,
    and the request runs again on the reseated worker (as after a process crash)."""
    from service.engine import pool

    write_model(tmp_path, "inl-crash", workers=1)
    closed = []
    monkeypatch.setattr(FakePredictor, "close", lambda self: closed.append(self))
    real_run_batch = pool.run_batch
    crash = [True]

    def crashing(predictor, request, worker_id):
        if crash:
            crash.pop()
            raise SystemError("batch runner bug (test)")
        return real_run_batch(predictor, request, worker_id)

    monkeypatch.setattr(pool, "run_batch", crashing)

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            (result,) = await engine.detect("inl-crash", [image(b"ok")])
            assert result.model_name == "inl-crash" and not crash
            assert len(closed) == 1 and closed[0].name == "inl-crash"  # the crashed seat's, closed once

    run(scenario())
