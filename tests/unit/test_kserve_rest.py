"""KServe V2 REST router over a small fake engine: JSON tensors, binary extension, raw mode, errors."""
from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.errors import InvalidImage, InvalidRequest, ModelNotFound
from service.protocols import kserve_codec as codec
from service.protocols.rest.app import install_error_handlers
from service.protocols.rest.kserve_v2 import router
from service.types import BatchSettings, DetectResult, Detection, EncodedImage, ModelInfo, RawImage


class ToyEngine:
    """len(data) % 3 detections per image; data starting with b"bad" is an invalid image."""

    def __init__(self):
        self.calls = []

    def model_info(self, model):
        if model != "toy":
            raise ModelNotFound(f"model '{model}' is not loaded")
        return ModelInfo("toy", "toy-1", "null", "eager", ("cat", "dog"), 320, False, True, BatchSettings())

    async def detect(self, model, images, options=None, **kwargs):
        self.calls.append((images, options, kwargs))
        out = []
        for image in images:
            data = image.data if isinstance(image, EncodedImage) else image.pixels
            if data.startswith(b"bad"):
                raise InvalidImage("cannot decode image")
            dets = [Detection(i, ("cat", "dog")[i], 0.5 + 0.1 * i, (i, 1.0, 2.0, 3.5)) for i in range(len(data) % 3)]
            out.append(DetectResult(dets, 10, 10, "toy", "toy-1"))
        return out

    def live(self):
        return True

    def ready(self):
        return True

    def model_ready(self, model):
        return model == "toy"


@pytest.fixture
def client():
    app = FastAPI()
    app.state.engine = ToyEngine()
    install_error_handlers(app)  # as build_inference_app does: the router raises, the one table renders
    app.include_router(router)
    return TestClient(app)


def test_health_and_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/models/toy/ready").json() == {"name": "toy", "ready": True}
    meta = client.get("/v2/models/toy").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "scores", "labels", "num_detections"]
    assert client.get("/v2/models/toy/versions/toy-1").status_code == 200
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert client.get("/v2/models/toy/versions/7/ready").status_code == 404


def test_json_infer_with_parameters(client):
    body = {"id": "42", "parameters": {"score_thr": 0.2, "classes": "cat,dog"},
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(b"ab").decode(), {"b64": base64.b64encode(b"a").decode()}]}],
            "outputs": [{"name": "num_detections"}, {"name": "boxes"}]}
    res = client.post("/v2/models/toy/infer", json=body)
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["id"] == "42" and out["model_version"] == "toy-1"
    assert [o["name"] for o in out["outputs"]] == ["num_detections", "boxes"]
    assert out["outputs"][0]["data"] == [2, 1]
    assert out["outputs"][1]["shape"] == [2, 2, 4] and out["outputs"][1]["data"][4:8] == [1.0, 1.0, 2.0, 3.5]
    options = client.app.state.engine.calls[-1][1]
    assert options.score_thr == 0.2 and options.classes == ("cat", "dog")


def test_binary_extension_in_and_out(client):
    pixels = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 4, 5, 3],
                                     "parameters": {"binary_data_size": pixels.nbytes, "channel_order": "BGR"}}],
                         "parameters": {"binary_data_output": True}}).encode()
    res = client.post("/v2/models/toy/infer", content=header + pixels.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert res.status_code == 200, res.text
    split = int(res.headers["inference-header-content-length"])
    meta = json.loads(res.content[:split])
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert sum(sizes) == len(res.content) - split
    images = client.app.state.engine.calls[-1][0]
    assert isinstance(images[0], RawImage) and images[0].channel_order == "BGR" and images[1].pixels == pixels[1].tobytes()
    num = meta["outputs"][3]
    start = split + sum(sizes[:3])
    assert num["name"] == "num_detections" and np.frombuffer(res.content[start:start + sizes[3]], "<i4").tolist() == [0, 0]


def test_raw_mode_posts_a_file_unchanged(client):
    res = client.post("/v2/models/toy/infer", content=b"\xff\xd8jpeg-ish",
                      headers={"Inference-Header-Content-Length": "0"})
    assert res.status_code == 200, res.text
    assert client.app.state.engine.calls[-1][0] == [EncodedImage(b"\xff\xd8jpeg-ish")]
    assert res.json()["outputs"][3]["data"] == [len(b"\xff\xd8jpeg-ish") % 3]


@pytest.mark.parametrize("body,headers,status", [
    (b"{not json", {}, 400),
    (json.dumps({"inputs": []}).encode(), {}, 400),  # missing input
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(), {}, 400),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["YQ=="]}]}).encode(), {}, 400),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YmFk"]}]}).encode(), {}, 400),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}],
                 "outputs": [{"name": "nope"}]}).encode(), {}, 400),
    (b"{}", {"Inference-Header-Content-Length": "99"}, 400),
])
def test_bad_requests_get_v2_error_bodies(client, body, headers, status):
    res = client.post("/v2/models/toy/infer", content=body, headers=headers)
    assert res.status_code == status
    assert isinstance(res.json()["error"], str) and res.json()["error"]


def _nested(depth: int):
    data = [1]
    for _ in range(depth - 1):
        data = [data]
    return data


def _binary(shape, raw: bytes = b"") -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _bytes_binary(raw: bytes) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("body,headers,needle", [
    # JSON nested as deep as orjson allows: a 400, not a RecursionError
    (json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": _nested(900)}]}).encode(), {},
     "nested deeper"),
    (*_binary([2**40, 2**40, 0]), "dimension above"),
    (*_binary([2, 2**62, 0, 3]), "dimension above"),
    (*_binary([4, 2**31 - 1, 2**31 - 1, 0]), "not a valid array shape"),
    (*_binary([1] * 9), "at most 8"),
    (json.dumps({"inputs": [{"name": _nested(900), "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}] * 2}).encode(),
     {}, "got 2: ['?', '?']"),  # a name that is not a string is not str()-ed (a deep list recursed: 500)
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [True], "data": ["YQ=="]}]}).encode(), {},
     "list of ints"),  # JSON true is not a dimension
    # counts the client controls, each refused before per-item work (tensors, parameters, elements)
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}] * 1000}).encode(), {},
     "got 1000: " + str(["image"] * 10) + " and 990 more"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YQ=="]}],
                 "parameters": {f"p{i}": 1 for i in range(300)}}).encode(), {}, "request has 300 parameters"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["YQ=="],
                             "parameters": {f"p{i}": 1 for i in range(300)}}]}).encode(), {}, "at most 256"),
    (*_bytes_binary(b"\0\0\0\0" * 10_000), "more than the 1 element(s) its shape declares"),
])
def test_shapes_and_nesting_no_array_can_have_are_400s(client, body, headers, needle):
    res = client.post("/v2/models/toy/infer", content=body, headers=headers)
    assert res.status_code == 400, res.text
    assert needle in res.json()["error"]


def test_unknown_model_is_404(client):
    res = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert res.status_code == 404 and "nope" in res.json()["error"]


def test_bytes_element_framing_round_trip():
    items = [b"", b"abc", bytes(300)]
    packed = codec.pack_bytes_elements(items)
    assert packed[:4] == struct.pack("<I", 0) and codec.unpack_bytes_elements(packed) == items
    with pytest.raises(InvalidRequest):
        codec.unpack_bytes_elements(packed[:-1])
