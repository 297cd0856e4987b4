"""The malformed inputs the adversarial review found (issue 15), each a 4xx on its door, never a
500; the KServe output case is refused before any inference runs."""
from __future__ import annotations

import asyncio
import base64
import json

import grpc
import pytest
from fastapi.testclient import TestClient

from service import errors
from service.protocols.grpc.generated import grpc_service_pb2 as kpb
from service.protocols.grpc.generated import grpc_service_pb2_grpc as kpb_grpc
from service.protocols.grpc.server import start_grpc_server
from service.protocols.rest.app import build_inference_app
from service.settings import ServerSettings
from service.types import BatchSettings, DetectResult, ModelInfo


class CountingEngine:
    """One model "m" whose detect() only counts calls: a refused request must leave it at 0."""

    def __init__(self):
        self.calls = 0

    def model_info(self, model):
        if model != "m":
            raise errors.ModelNotFound(f"model {model!r} is not loaded")
        return ModelInfo("m", "m-1", "null", "eager", ("cat", "dog"), 64, False, True, BatchSettings(), max_per_img=100)

    def has_model(self, model):
        return model == "m"

    async def detect(self, model, images, options=None, **kwargs):
        self.calls += 1
        return [DetectResult([], 1, 1, "m", "m-1") for _ in images]

    def live(self):
        return True

    def ready(self):
        return True

    def model_ready(self, model):
        return model == "m"

    def models(self):
        return [self.model_info("m")]


def _infer_body(**overrides) -> dict:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(b"ok").decode()]}]}
    body.update(overrides)
    return body


@pytest.fixture()
def rest():
    engine = CountingEngine()
    with TestClient(build_inference_app(engine, ServerSettings()), raise_server_exceptions=False) as client:
        yield client, engine


@pytest.mark.parametrize("body", [
    _infer_body(parameters=[1, 2]),
    _infer_body(parameters="score_thr=0.5"),
    _infer_body(parameters={"classes": 7}),
    _infer_body(parameters={"max_dets": 1e308}),
    _infer_body(parameters={"score_thr": "nan"}),
    _infer_body(parameters={"binary_data_output": "yes"}),
    _infer_body(inputs=[{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["b2s="], "parameters": [1]}]),
    _infer_body(outputs=[{"name": "boxes", "parameters": "binary"}]),
    _infer_body(outputs=[{"name": "boxes", "parameters": {"binary_data": 1}}]),
    _infer_body(id={"nested": True}),
], ids=["request-list", "request-string", "classes-number", "max_dets-huge", "score_thr-nan", "binary-flag",
        "input-list", "output-string", "output-flag", "id-object"])
def test_kserve_rest_bad_parameters_are_400_before_inference(rest, body):
    client, engine = rest
    r = client.post("/v2/models/m/infer", json=body)
    assert r.status_code == 400, r.text
    assert "error" in r.json() and r.json()["code"] == "invalid_request"
    assert engine.calls == 0


_DEEP = "[" * 1000 + "]" * 1000  # repr() or str() of it is a RecursionError
_UINT8 = '{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3], "data": [1, 2, 3], '


@pytest.mark.parametrize("raw", [
    '{"inputs": [%s], "parameters": {"class_agnostic": %s}}' % (json.dumps(_infer_body()["inputs"][0]), _DEEP),
    '{"inputs": [%s], "parameters": {"box_format": %s}}' % (json.dumps(_infer_body()["inputs"][0]), _DEEP),
    '{"inputs": [%s], "parameters": {"tile": %s}}' % (json.dumps(_infer_body()["inputs"][0]), _DEEP),
    '{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": %s}}]}' % _DEEP,
    '{"inputs": [%s"parameters": {"channel_order": %s}}]}' % (_UINT8, _DEEP),
    '{"inputs": [{"name": "foo", "datatype": "BYTES", "shape": [1], "data": ["b2s="]}]}',
    # a million names within the size limit: refused in linear time, not after hours of list.count
    '{"inputs": [%s], "outputs": [%s]}' % (json.dumps(_infer_body()["inputs"][0]), ",".join(['{"name": "boxes"}'] * 200_000)),
], ids=["deep-bool", "deep-choice", "deep-tile", "deep-binary-size", "deep-channel-order", "undeclared-input",
        "output-200000-times"])
def test_kserve_rest_values_nested_without_end_undeclared_inputs_and_repeated_outputs_are_400(rest, raw):
    client, engine = rest
    r = client.post("/v2/models/m/infer", content=raw.encode(), headers={"Content-Type": "application/json"},
                    timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["code"] == "invalid_request" and len(r.json()["message"]) < 400
    assert engine.calls == 0


@pytest.mark.parametrize("value", ["²".encode("latin-1"), "١".encode(), b"-1", b"99999999999999999999999999"])
def test_kserve_rest_header_length_that_is_not_ascii_digits_is_400(rest, value):
    client, _ = rest
    header = json.dumps(_infer_body()).encode()
    r = client.post("/v2/models/m/infer", content=header, headers={"Inference-Header-Content-Length": value})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["message"]


@pytest.mark.parametrize("query, fragment", [
    ("score_thr=nan", "finite"), ("max_dets=101", "max_per_img"), ("max_dets=1e999", "finite"),
    ("score_thr=%C2%B2", "number"), ("classes=", "one or more"),
])
def test_torchserve_options_share_the_data_plane_rules(rest, query, fragment):
    client, engine = rest
    r = client.put(f"/predictions/m?{query}", content=b"ok")
    assert r.status_code == 400 and fragment in r.json()["message"], r.text
    assert engine.calls == 0


def test_kserve_grpc_max_dets_inf_and_classes_number_are_invalid_argument():
    async def scenario():
        engine = CountingEngine()
        server = await start_grpc_server(engine, ServerSettings(grpc_address="127.0.0.1", grpc_port=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.detserve_port}") as channel:
                stub = kpb_grpc.GRPCInferenceServiceStub(channel)
                for name, param in [("max_dets", kpb.InferParameter(double_param=float("inf"))),
                                    ("classes", kpb.InferParameter(int64_param=3)),
                                    ("score_thr", kpb.InferParameter(double_param=float("nan")))]:
                    request = kpb.ModelInferRequest(model_name="m")
                    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ok")
                    request.parameters[name].CopyFrom(param)
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await stub.ModelInfer(request)
                    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
                    assert name in caught.value.details()
            assert engine.calls == 0
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_a_tensor_of_a_million_empty_images_is_413_before_they_are_built(rest):
    client, engine = rest
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1_000_000],
                                     "parameters": {"binary_data_size": 4_000_000}}]}).encode()
    r = client.post("/v2/models/m/infer", content=header + b"\x00" * 4_000_000,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 413 and "4096" in r.json()["message"]
    pixels = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [500_000, 0, 0, 3], "data": []}]})
    r = client.post("/v2/models/m/infer", content=pixels)
    assert r.status_code == 413 and engine.calls == 0
