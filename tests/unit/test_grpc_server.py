"""The gRPC doors over a small fake engine: conversions, errors, deadlines, streaming order, health."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.errors import InvalidImage, ModelNotFound, Overloaded
from service.protocols import kserve_codec as codec
from service.protocols.grpc.generated import detserve_pb2 as pb
from service.protocols.grpc.generated import detserve_pb2_grpc as pb_grpc
from service.protocols.grpc.generated import grpc_service_pb2 as kpb
from service.protocols.grpc.generated import grpc_service_pb2_grpc as kpb_grpc
from service.protocols.grpc.common import STREAM_WINDOW
from service.protocols.grpc.server import start_grpc_server
from service.settings import ServerSettings
from service.types import BatchSettings, DetectResult, Detection, EncodedImage, ModelInfo, RawImage, RLEMask


class FakeEngine:
    """Answers from the image bytes: b"bad..." is an invalid image, b"full" overloads, b"slow" waits;
    otherwise len(data) % 4 detections. Records every call's timeout."""

    def __init__(self, has_masks: bool = False):
        self.has_masks = has_masks
        self.timeouts: list[float | None] = []
        self.request_ids: list[str | None] = []
        self.ready_models = {"toy"}
        self.in_flight = self.max_in_flight = 0

    def _info(self) -> ModelInfo:
        return ModelInfo("toy", "toy-abc12345", "null", "eager", ("cat", "dog"), 320, self.has_masks,
                         "toy" in self.ready_models, BatchSettings())

    async def detect(self, model, images, options=None, *, protocol=None, request_id=None, timeout_s=None):
        self.timeouts.append(timeout_s)
        self.request_ids.append(request_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._detect(model, images)
        finally:
            self.in_flight -= 1

    async def _detect(self, model, images):
        if model != "toy":
            raise ModelNotFound(f"model '{model}' is not loaded")
        out = []
        for image in images:
            data = image.data if isinstance(image, EncodedImage) else image.pixels
            if data.startswith(b"bad"):
                raise InvalidImage("cannot decode image")
            if data == b"full":
                raise Overloaded("queue full", retry_after_s=2.0)
            if data == b"slow":
                await asyncio.sleep(5)
            if data.startswith(b"tick"):
                await asyncio.sleep(0.01)
            n = len(data) % 4
            mask = RLEMask(4, 5, "abc") if self.has_masks else None
            dets = [Detection(i % 2, ("cat", "dog")[i % 2], 0.9 - 0.1 * i, (1.0 * i, 2.0, 3.0 + i, 4.0), mask)
                    for i in range(n)]
            w = image.width if isinstance(image, RawImage) else 64
            out.append(DetectResult(dets, w, 48, "toy", "toy-abc12345"))
        return out

    def live(self):
        return True

    def ready(self):
        return bool(self.ready_models)

    def model_ready(self, model):
        return model in self.ready_models

    def models(self):
        return [self._info()]

    def model_info(self, model):
        if model != "toy":
            raise ModelNotFound(f"model '{model}' is not loaded")
        return self._info()


@pytest.fixture
def run():
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


async def _serve(engine, **settings):
    server = await start_grpc_server(engine, ServerSettings(grpc_address="127.0.0.1", grpc_port=0, **settings))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.detserve_port}")
    return server, channel


def test_detect_batch_stream_and_errors(run):
    async def scenario():
        engine = FakeEngine()
        server, channel = await _serve(engine)
        try:
            stub = pb_grpc.DetectorStub(channel)
            res = await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"abc")), timeout=10)
            assert [d.class_name for d in res.detections] == ["cat", "dog", "cat"]
            assert res.detections[1].box.x2 == pytest.approx(4.0) and res.image_width == 64
            assert 0 < engine.timeouts[-1] <= 10  # the deadline reached the engine

            batch = await stub.DetectBatch(pb.DetectBatchRequest(
                model="toy", images=[pb.Image(encoded=b"a"), pb.Image(raw=pb.RawImage(pixels=bytes(12), height=2, width=2))]))
            assert [len(r.detections) for r in batch.results] == [1, 0] and batch.results[1].image_width == 2

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"bad")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(model="nope", image=pb.Image(encoded=b"x")))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"full")))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "2") in tuple(err.value.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"slow")), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(options=pb.DetectOptions(score_thr=3.0), image=pb.Image(encoded=b"x")))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            async def frames():
                for i in range(40):
                    yield pb.StreamFrame(frame_id=i, image=pb.Image(encoded=b"bad" if i == 7 else b"x" * i))
            results = [r async for r in stub.DetectStream(frames())]
            assert [r.frame_id for r in results] == list(range(40))
            assert results[7].error.grpc_status == "INVALID_ARGUMENT"
            assert len(results[5].result.detections) == 1

            engine.max_in_flight = 0

            async def fast_producer():
                for i in range(60):
                    yield pb.StreamFrame(frame_id=i, image=pb.Image(encoded=b"tick"))
            ids = [r.frame_id async for r in stub.DetectStream(fast_producer())]
            assert ids == list(range(60))
            assert 1 < engine.max_in_flight <= STREAM_WINDOW  # frames overlap, but never more than the window

            models = await stub.ListModels(pb.ListModelsRequest())
            assert [m.name for m in models.models] == ["toy"] and list(models.models[0].classes) == ["cat", "dog"]
            info = await stub.ModelInfo(pb.ModelInfoRequest(model="toy"))
            assert info.version == "toy-abc12345"
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_long_client_strings_still_get_the_table_s_status_and_trailer(run):
    """Client values quoted in a message must not push the status past the client's 16 KiB
    metadata limit (which ends the call RESOURCE_EXHAUSTED, without our status or trailer)."""
    async def scenario():
        engine = FakeEngine()
        server, channel = await _serve(engine)
        try:
            stub, kstub = pb_grpc.DetectorStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                lambda: stub.Detect(pb.DetectRequest(model="m" * 100_000, image=pb.Image(encoded=b"x")), timeout=10),
                lambda: stub.ModelInfo(pb.ModelInfoRequest(model="m" * 100_000), timeout=10),
                lambda: kstub.ModelInfer(kpb.ModelInferRequest(model_name="m" * 100_000), timeout=10),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()[:200]
                assert ("detserve-error", "model_not_found") in tuple(err.value.trailing_metadata())
                assert len(err.value.details()) <= 1000
            await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"x"), request_id="r" * 20_000), timeout=10)
            await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"x"), request_id="frame-7"), timeout=10)
            long_id, short_id = engine.request_ids[-2:]
            assert len(long_id) <= 128 and short_id == "frame-7"  # replaced only when unfit for logs
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_undecodable_and_oversized_messages(run):
    async def scenario():
        server, channel = await _serve(FakeEngine(), max_request_size=4096)
        try:
            raw = channel.unary_unary("/detserve.v1.Detector/Detect")  # no serializer: bytes go as they are
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\xff\xff\xff\xff")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub = pb_grpc.DetectorStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"x" * 10_000)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_kserve_infer_raw_and_typed(run):
    async def scenario():
        engine = FakeEngine(has_masks=True)
        server, channel = await _serve(engine)
        try:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(kpb.ServerLiveRequest())).live
            assert (await stub.ServerReady(kpb.ServerReadyRequest())).ready
            assert (await stub.ModelReady(kpb.ModelReadyRequest(name="toy"))).ready
            meta = await stub.ModelMetadata(kpb.ModelMetadataRequest(name="toy"))
            assert [o.name for o in meta.outputs] == ["boxes", "scores", "labels", "num_detections", "masks_rle"]
            assert list(meta.outputs[0].shape) == [-1, -1, 4]

            tensor = kpb.ModelInferRequest.InferInputTensor
            req = kpb.ModelInferRequest(
                model_name="toy", id="r1", inputs=[tensor(name="image", datatype="BYTES", shape=[2])],
                raw_input_contents=[codec.pack_bytes_elements([b"abc", b"a"])])
            res = await stub.ModelInfer(req)
            assert res.id == "r1" and res.model_version == "toy-abc12345"
            outs = {o.name: (o, raw) for o, raw in zip(res.outputs, res.raw_output_contents)}
            boxes = np.frombuffer(outs["boxes"][1], dtype="<f4").reshape(list(outs["boxes"][0].shape))
            assert boxes.shape == (2, 3, 4) and boxes[0, 1].tolist() == [1.0, 2.0, 4.0, 4.0]
            assert np.frombuffer(outs["num_detections"][1], dtype="<i4").tolist() == [3, 1]
            masks = codec.unpack_bytes_elements(outs["masks_rle"][1])
            assert len(masks) == 6 and masks[3] != b"" and masks[4] == b""

            typed = kpb.ModelInferRequest(
                model_name="toy", inputs=[tensor(name="image", datatype="UINT8", shape=[2, 2, 3],
                                                 contents=kpb.InferTensorContents(uint_contents=list(range(12))))],
                outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="scores")])
            res = await stub.ModelInfer(typed)
            assert [o.name for o in res.outputs] == ["scores"] and list(res.outputs[0].shape) == [1, 0]

            bad = [
                (kpb.ModelInferRequest(model_name="toy"), grpc.StatusCode.INVALID_ARGUMENT),
                (kpb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
                (kpb.ModelInferRequest(model_name="toy", inputs=[tensor(name="image", datatype="FP32", shape=[1],
                 contents=kpb.InferTensorContents(fp32_contents=[1.0]))]), grpc.StatusCode.INVALID_ARGUMENT),
                (kpb.ModelInferRequest(model_name="toy", inputs=[tensor(name="image", datatype="BYTES", shape=[3])],
                 raw_input_contents=[codec.pack_bytes_elements([b"x"])]), grpc.StatusCode.INVALID_ARGUMENT),
                (kpb.ModelInferRequest(model_name="toy", model_version="9", inputs=[tensor(name="image", datatype="BYTES",
                 shape=[1])], raw_input_contents=[codec.pack_bytes_elements([b"x"])]), grpc.StatusCode.NOT_FOUND),
            ]
            for request, code in bad:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(request)
                assert err.value.code() == code, request

            async def stream():
                yield req
                yield kpb.ModelInferRequest(model_name="nope", id="bad")
                yield req
            responses = [r async for r in stub.ModelStreamInfer(stream())]
            assert [r.error_message != "" for r in responses] == [False, True, False]
            assert responses[1].infer_response.id == "bad"
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_health_follows_model_readiness_and_reflection_lists_services(run):
    async def scenario():
        engine = FakeEngine()
        server, channel = await _serve(engine)
        try:
            health = health_pb2_grpc.HealthStub(channel)
            serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == serving
            assert (await health.Check(health_pb2.HealthCheckRequest(service="toy"))).status == serving
            watch = health.Watch(health_pb2.HealthCheckRequest(service="toy"))  # a context.write handler
            assert (await watch.read()).status == serving
            watch.cancel()

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = [r async for r in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            services = {s.name for s in listed[0].list_services_response.service}
            assert {"detserve.v1.Detector", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services

            engine.ready_models.clear()
            for _ in range(40):
                await asyncio.sleep(0.1)
                if (await health.Check(health_pb2.HealthCheckRequest(service="toy"))).status == not_serving:
                    break
            assert (await health.Check(health_pb2.HealthCheckRequest(service="toy"))).status == not_serving
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == not_serving
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_token_auth_metadata(run):
    async def scenario():
        server, channel = await _serve(FakeEngine(), auth={"inference_tokens": ["s3cret"], "management_tokens": ["adm"]})
        try:
            stub = pb_grpc.DetectorStub(channel)
            request = pb.DetectRequest(image=pb.Image(encoded=b"a"))
            cases = [(None, grpc.StatusCode.UNAUTHENTICATED), ((("authorization", "Bearer nope"),), grpc.StatusCode.UNAUTHENTICATED),
                     ((("authorization", "Bearer adm"),), grpc.StatusCode.PERMISSION_DENIED)]
            for metadata, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Detect(request, metadata=metadata)
                assert err.value.code() == code
                # the trailer every other error carries tells the two UNAUTHENTICATED cases apart from others
                assert dict(err.value.trailing_metadata())["detserve-error"] in ("unauthenticated", "permission_denied")
            res = await stub.Detect(request, metadata=(("authorization", "Bearer s3cret"),))
            assert len(res.detections) == 1

            async def frames():
                yield pb.StreamFrame(frame_id=1, image=pb.Image(encoded=b"a"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.DetectStream(frames())]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = [r async for r in stub.DetectStream(frames(), metadata=(("authorization", "Bearer s3cret"),))]
            assert [r.frame_id for r in ok] == [1]
            health = health_pb2_grpc.HealthStub(channel)  # health stays open by default
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_failed_calls_keep_nothing_and_typed_contents_are_counted_before_copying(run):
    """A refused call's request must be freed when the call ends, not when the cycle collector
    next runs (context.abort() kept it in a reference cycle); and a `contents` request whose
    element count cannot match its shape is refused before its elements become Python objects."""
    import gc
    import tracemalloc

    tensor = kpb.ModelInferRequest.InferInputTensor
    bad_image = pb.DetectRequest(image=pb.Image(encoded=b"bad" + bytes(2_000_000)))
    raw_mismatch = kpb.ModelInferRequest(model_name="toy", inputs=[tensor(name="image", datatype="BYTES", shape=[1])],
                                         raw_input_contents=[codec.pack_bytes_elements([bytes(2_000_000)] * 2)])
    many = kpb.ModelInferRequest(model_name="toy", inputs=[tensor(
        name="image", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"x"] * 1_000_000))])
    big_uint8 = kpb.ModelInferRequest(model_name="toy", inputs=[tensor(
        name="image", datatype="UINT8", shape=[1, 10], contents=kpb.InferTensorContents(uint_contents=[7] * 1_000_000))])

    async def scenario():
        server, channel = await _serve(FakeEngine(), max_request_size=64 << 20)
        try:
            stub, kstub = pb_grpc.DetectorStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)
            await stub.Detect(pb.DetectRequest(image=pb.Image(encoded=b"warm")))
            gc.collect()
            gc.disable()
            tracemalloc.start()
            try:
                for call, request in [(stub.Detect, bad_image)] * 3 + [(kstub.ModelInfer, raw_mismatch)] * 3:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(request)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                kept, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                for request in (many, big_uint8):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await kstub.ModelInfer(request)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "needs 1" in err.value.details() or "needs 10" in err.value.details()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                gc.enable()
            return kept, peak
        finally:
            await channel.close()
            await server.stop(None)

    kept, peak = run(scenario())
    assert kept < 2_000_000, f"{kept} bytes still held after 6 failed calls of 2-4 MB each"
    assert peak < 10_000_000, f"peak {peak} bytes while refusing 1,000,000-element contents"


def test_kserve_refuses_an_input_it_does_not_declare_and_an_output_asked_twice(run):
    async def scenario():
        server, channel = await _serve(FakeEngine())
        try:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            tensor = kpb.ModelInferRequest.InferInputTensor
            output = kpb.ModelInferRequest.InferRequestedOutputTensor
            good = dict(model_name="toy", raw_input_contents=[codec.pack_bytes_elements([b"abc"])])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(kpb.ModelInferRequest(inputs=[tensor(name="foo", datatype="BYTES", shape=[1])],
                                                            **good))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "unexpected input 'foo'" in err.value.details() and "'image'" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(kpb.ModelInferRequest(inputs=[tensor(name="image", datatype="BYTES", shape=[1])],
                                                            outputs=[output(name="scores"), output(name="scores")], **good))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in err.value.details()
            res = await stub.ModelInfer(kpb.ModelInferRequest(inputs=[tensor(name="image", datatype="BYTES", shape=[1])],
                                                              outputs=[output(name="scores")], **good))
            assert [o.name for o in res.outputs] == ["scores"]
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_client_controlled_counts_are_refused_before_per_item_work(run):
    """Within the 16 MiB limit a request holds hundreds of thousands of inputs, parameters, class
    names or empty BYTES elements; each is refused by its count, and the message says so."""
    async def scenario():
        server, channel = await _serve(FakeEngine())
        try:
            kstub, stub = kpb_grpc.GRPCInferenceServiceStub(channel), pb_grpc.DetectorStub(channel)
            tensor = kpb.ModelInferRequest.InferInputTensor
            image = tensor(name="image", datatype="BYTES", shape=[1])
            one = [codec.pack_bytes_elements([b"abc"])]
            cases = {
                "expected one input tensor, got 100000: " + str(["image"] * 10) + " and 99990 more": kpb.ModelInferRequest(
                    model_name="toy", inputs=[image] * 100_000),
                "more than the 1 element(s) its shape declares": kpb.ModelInferRequest(
                    model_name="toy", inputs=[image], raw_input_contents=[b"\0\0\0\0" * 100_000]),
                f"request has 1000 parameters; at most {codec.MAX_PARAMETERS}": kpb.ModelInferRequest(
                    model_name="toy", inputs=[image], raw_input_contents=one,
                    parameters={f"p{i}": kpb.InferParameter(bool_param=True) for i in range(1000)}),
                "its data is in raw_input_contents, so 'contents' must be unset": kpb.ModelInferRequest(
                    model_name="toy", raw_input_contents=one,
                    inputs=[tensor(name="image", datatype="BYTES", shape=[1],
                                   contents=kpb.InferTensorContents(bytes_contents=[b"junk"]))]),
            }
            for expected, request in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await kstub.ModelInfer(request, timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert expected in err.value.details(), err.value.details()[:200]
            # the model first, as on REST: an unknown one is NOT_FOUND whatever the request holds
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await kstub.ModelInfer(kpb.ModelInferRequest(model_name="nope", inputs=[image] * 1000), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # 5000 empty names used to be deduplicated to none ("give one or more class names")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(pb.DetectRequest(model="toy", image=pb.Image(encoded=b"x"),
                                                   options=pb.DetectOptions(classes=[""] * 5000)), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 1024 names, got 5000" in err.value.details()
            ok = await kstub.ModelInfer(kpb.ModelInferRequest(model_name="toy", inputs=[image], raw_input_contents=one,
                                                              parameters={f"p{i}": kpb.InferParameter(bool_param=True)
                                                                          for i in range(codec.MAX_PARAMETERS)}))
            assert ok.model_name == "toy"  # up to the bound, unknown parameters are ignored as before
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_non_ascii_client_strings_keep_the_status_within_grpc_metadata_limits(run):
    """A status message is percent-encoded on the wire: 1000 emoji are 12 KB, past grpc's 8 KiB soft
    limit, and the call then ended RESOURCE_EXHAUSTED at random instead of NOT_FOUND."""
    async def scenario():
        server, channel = await _serve(FakeEngine())
        try:
            stub = pb_grpc.DetectorStub(channel)
            for name in ("😀" * 5000, "中" * 5000, "x\udc80" * 10):
                for _ in range(10):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Detect(pb.DetectRequest(model=name.encode("utf-8", "replace").decode(),
                                                           image=pb.Image(encoded=b"x")), timeout=10)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                    assert len(err.value.details().encode()) <= 1000
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_undecodable_reflection_request_is_invalid_argument_not_unknown(run):
    async def scenario():
        server, channel = await _serve(FakeEngine())
        try:
            raw = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            call = raw()
            await call.write(b"\xff\xff\xff\xff")
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message" in err.value.details()
        finally:
            await channel.close()
            await server.stop(None)

    run(scenario())


def test_a_spent_deadline_is_deadline_exceeded_not_invalid_argument():
    from service.errors import DeadlineExceeded
    from service.protocols.grpc.common import timeout_from

    class Context:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

    assert timeout_from(Context(None)) is None and timeout_from(Context(2.5)) == 2.5
    for spent in (0.0, -0.001):
        with pytest.raises(DeadlineExceeded):
            timeout_from(Context(spent))
