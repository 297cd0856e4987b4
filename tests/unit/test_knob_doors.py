"""Issue 18's knobs through every door of one in-process server (the bundled rtmdet-ins, eager):
TorchServe REST query parameters, KServe V2 REST and gRPC `parameters`, detserve gRPC DetectOptions.
Each door must hand the same DetectOptions to the engine, return what the in-process Predictor
returns for them (boxes written by protocols/render.py), and refuse a bad value with 400 /
INVALID_ARGUMENT naming the parameter and what it accepts."""
from __future__ import annotations

import asyncio
import dataclasses
import base64
import json
import os
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from service.engine.engine import Engine
from service.pipeline.predictor import Predictor
from service.protocols.grpc import convert
from service.protocols.grpc.generated import detserve_pb2 as pb
from service.protocols.grpc.generated import detserve_pb2_grpc, grpc_service_pb2_grpc
from service.protocols.grpc.generated import grpc_service_pb2 as kpb
from service.protocols.grpc.server import start_grpc_server
from service.protocols.render import box_to
from service.protocols.rest.app import build_inference_app
from service.settings import ServerSettings, load_model_config
from service.types import BoxFormat, DetectOptions, EncodedImage, MaskFormat, TileMerge

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "rtmdet-ins"
MODEL = "rtmdet-ins"
IMAGE = (BUNDLED / "demo.jpg").read_bytes()
EXPECTED_IMAGE = EncodedImage(IMAGE)
# Every knob at a non-default value; tile "off" keeps the answer comparable with one Predictor call
# (tiling's own results are tests/unit/test_tiling.py's business; the options record shows them arriving).
KNOBS = {"score_thr": "0.05", "iou_thr": "0.3", "class_agnostic": "true", "box_format": "cxcywh",
         "normalized": "true", "mask_format": "polygon", "tile": "off", "tile_overlap": "0.25", "tile_merge": "nmm"}
EXPECTED = DetectOptions(score_thr=0.05, iou_thr=0.3, class_agnostic=True, box_format=BoxFormat.CXCYWH,
                         normalized=True, mask_format=MaskFormat.POLYGON, tile="off", tile_overlap=0.25,
                         tile_merge=TileMerge.NMM)
# (parameter, bad value, what the message must name as allowed)
BAD = [("iou_thr", "0", "(0, 1]"), ("class_agnostic", "maybe", "true, false, 1, 0"),
       ("box_format", "yolo", "xyxy, xywh, cxcywh"), ("normalized", "2", "true, false, 1, 0"),
       ("mask_format", "png", "rle, polygon, none"), ("tile", "16", "auto, off or a tile side in pixels within [32, 8192]"),
       ("tile_overlap", "0.9", "[0, 0.5]"), ("tile_merge", "wbf", "nms, nmm")]


class RecordingEngine:
    """The real engine, remembering the options each detect call carried."""

    def __init__(self, engine):
        self._engine = engine
        self.options: list[DetectOptions] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def detect(self, model, images, options=None, **kwargs):
        self.options.append(options)
        return self._engine.detect(model, images, options, **kwargs)


class Served:
    def __init__(self, loop, engine, http, grpc_port, predictor):
        self.loop, self.engine, self.http, self.predictor = loop, engine, http, predictor
        self.target = f"127.0.0.1:{grpc_port}"
        self.channel = loop.run_until_complete(_channel(self.target))

    def run(self, call):
        """Run `call()` (an awaitable factory) on the server's loop. A factory, not an awaitable: grpc.aio
        binds a call to the loop current when it is made, and outside the loop there may be none."""
        async def inside():
            return await call()

        return self.loop.run_until_complete(asyncio.wait_for(inside(), 60))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = tmp_path_factory.mktemp("knob-doors")
    folder = store / MODEL
    folder.mkdir()
    os.symlink(BUNDLED / "weights.pth", folder / "weights.pth")
    text = (BUNDLED / "model.toml").read_text()
    (folder / "model.toml").write_text('backend = "eager"\ndevice = "cpu"\n' + text + "\n[workers]\nthreads = 1\n")
    settings = ServerSettings(model_store=store, grpc_address="127.0.0.1", grpc_port=0)
    loop = asyncio.new_event_loop()
    engine = RecordingEngine(Engine(settings, inline=True))
    loop.run_until_complete(engine.start())
    app = build_inference_app(engine, settings)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    server = loop.run_until_complete(start_grpc_server(engine, settings))
    predictor = Predictor.from_config(load_model_config(folder), threads=1)
    served = Served(loop, engine, http, server.detserve_port, predictor)
    yield served
    predictor.close()
    loop.run_until_complete(served.channel.close())
    loop.run_until_complete(server.stop(None))
    loop.run_until_complete(http.aclose())
    loop.run_until_complete(engine.stop(5.0))
    loop.close()


async def _channel(target: str):
    return grpc.aio.insecure_channel(target)  # made inside the loop it serves


def _expected(served):
    """What the door must render: the Predictor's own result for EXPECTED, boxes through render."""
    (result,) = served.predictor.predict([EXPECTED_IMAGE], [EXPECTED])
    assert result.detections, "the bundled model finds the demo image's shapes"
    boxes = [box_to(d.box_xyxy, BoxFormat.CXCYWH, True, result.image_width, result.image_height)
             for d in result.detections]
    return result, np.asarray(boxes)



def _check_same(served, labels, scores, boxes, polygons):
    result, want_boxes = _expected(served)
    got = served.engine.options[-1]  # proto floats are float32: compare those at 1e-6
    rounded = {f: round(getattr(got, f), 6) for f in ("score_thr", "iou_thr", "tile_overlap")}
    assert dataclasses.replace(got, **rounded) == EXPECTED
    assert list(labels) == [d.label for d in result.detections]
    np.testing.assert_allclose(scores, [d.score for d in result.detections], atol=1e-4)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4)
    assert np.all((np.asarray(boxes) >= 0) & (np.asarray(boxes) <= 1))  # normalized
    assert [len(p) for p in polygons] == [len(d.polygons) for d in result.detections]
    for got, det in zip(polygons, result.detections):
        np.testing.assert_allclose(got[0], det.polygons[0], atol=1e-2)
    # the knobs changed the answer: plain defaults give other detections
    (plain,) = served.predictor.predict([EXPECTED_IMAGE], [DetectOptions(score_thr=0.05)])
    assert len(plain.detections) != len(result.detections) or plain.detections[0].mask is not None


# ---- TorchServe REST ------------------------------------------------------------------------

def test_rest_query_parameters_carry_every_knob(served):
    response = served.run(lambda: served.http.post(f"/predictions/{MODEL}", params=KNOBS, content=IMAGE))
    assert response.status_code == 200, response.text
    dets = response.json()
    assert all("segmentation" not in d for d in dets)
    _check_same(served, [d["class_label"] for d in dets], [d["score"] for d in dets], [d["bbox"] for d in dets],
                [d["polygons"] for d in dets])


def test_rest_mask_format_none_and_default_xyxy(served):
    response = served.run(lambda: served.http.post(f"/predictions/{MODEL}", params={"mask_format": "none"}, content=IMAGE))
    dets = response.json()
    assert response.status_code == 200 and dets
    assert all("segmentation" not in d and "polygons" not in d for d in dets)
    (result,) = served.predictor.predict([EXPECTED_IMAGE], [DetectOptions()])
    np.testing.assert_allclose([d["bbox"] for d in dets], [d.box_xyxy for d in result.detections], atol=0.01)


@pytest.mark.parametrize("name, value, allowed", BAD)
def test_rest_bad_knob_is_400_naming_parameter_and_allowed_values(served, name, value, allowed):
    response = served.run(lambda: served.http.post(f"/predictions/{MODEL}", params={name: value}, content=IMAGE))
    assert response.status_code == 400
    message = response.json()["message"]
    assert name in message and allowed in message


# ---- KServe V2 REST -------------------------------------------------------------------------

def _v2_body(parameters: dict) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(IMAGE).decode()]}],
            "parameters": parameters}


def _json_knobs() -> dict:
    return {"score_thr": 0.05, "iou_thr": 0.3, "class_agnostic": True, "box_format": "cxcywh", "normalized": True,
            "mask_format": "polygon", "tile": "off", "tile_overlap": 0.25, "tile_merge": "nmm"}


def test_kserve_rest_parameters_carry_every_knob(served):
    response = served.run(lambda: served.http.post(f"/v2/models/{MODEL}/infer", json=_v2_body(_json_knobs())))
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert "masks_rle" not in outputs
    k = outputs["num_detections"]["data"][0]
    boxes = np.asarray(outputs["boxes"]["data"], np.float32).reshape(outputs["boxes"]["shape"])[0, :k]
    polygons = [json.loads(p) for p in outputs["masks_polygon"]["data"][:k]]
    _check_same(served, outputs["labels"]["data"][:k], outputs["scores"]["data"][:k], boxes, polygons)


def test_kserve_rest_mask_format_none_has_no_mask_output(served):
    response = served.run(lambda: served.http.post(f"/v2/models/{MODEL}/infer", json=_v2_body({"mask_format": "none"})))
    assert response.status_code == 200
    assert [o["name"] for o in response.json()["outputs"]] == ["boxes", "scores", "labels", "num_detections"]


@pytest.mark.parametrize("name, value, allowed", BAD[:4] + BAD[5:6])
def test_kserve_rest_bad_knob_is_400(served, name, value, allowed):
    response = served.run(lambda: served.http.post(f"/v2/models/{MODEL}/infer", json=_v2_body({name: value})))
    assert response.status_code == 400
    body = response.json()
    assert name in body["error"] if "error" in body else name in body["message"]
    assert allowed in json.dumps(body)


# ---- KServe V2 gRPC -------------------------------------------------------------------------

def _kserve_request(parameters: dict) -> kpb.ModelInferRequest:
    params = {}
    for key, value in parameters.items():
        if isinstance(value, bool):
            params[key] = kpb.InferParameter(bool_param=value)
        elif isinstance(value, int):
            params[key] = kpb.InferParameter(int64_param=value)
        elif isinstance(value, float):
            params[key] = kpb.InferParameter(double_param=value)
        else:
            params[key] = kpb.InferParameter(string_param=value)
    tensor = kpb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1],
                                                    contents=kpb.InferTensorContents(bytes_contents=[IMAGE]))
    return kpb.ModelInferRequest(model_name=MODEL, inputs=[tensor], parameters=params)


def test_kserve_grpc_parameters_carry_every_knob(served):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(served.channel)
    response = served.run(lambda: stub.ModelInfer(_kserve_request(_json_knobs())))
    raw = dict(zip([o.name for o in response.outputs], response.raw_output_contents))
    shapes = {o.name: list(o.shape) for o in response.outputs}
    from service.protocols.kserve_codec import unpack_bytes_elements

    k = int(np.frombuffer(raw["num_detections"], np.int32)[0])
    boxes = np.frombuffer(raw["boxes"], np.float32).reshape(shapes["boxes"])[0, :k]
    polygons = [json.loads(p) for p in unpack_bytes_elements(raw["masks_polygon"])[:k]]
    _check_same(served, np.frombuffer(raw["labels"], np.int32)[:k], np.frombuffer(raw["scores"], np.float32)[:k],
                boxes, polygons)


@pytest.mark.parametrize("name, value, allowed", [("box_format", "yolo", "xyxy, xywh, cxcywh"),
                                                  ("iou_thr", 0.0, "(0, 1]"), ("tile", 9000, "[32, 8192]")])
def test_kserve_grpc_bad_knob_is_invalid_argument(served, name, value, allowed):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        served.run(lambda: stub.ModelInfer(_kserve_request({name: value})))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in caught.value.details() and allowed in caught.value.details()


# ---- detserve gRPC --------------------------------------------------------------------------

def test_detserve_grpc_fields_carry_every_knob(served):
    stub = detserve_pb2_grpc.DetectorStub(served.channel)
    request = pb.DetectRequest(model=MODEL, image=pb.Image(encoded=IMAGE), options=convert.options_to_proto(EXPECTED))
    response = served.run(lambda: stub.Detect(request))
    dets = response.detections
    assert all(not d.HasField("mask") for d in dets)
    _check_same(served, [d.label for d in dets], [d.score for d in dets], [list(d.bbox) for d in dets],
                [[list(p.points) for p in d.polygons] for d in dets])
    # `box` stays xyxy pixels whatever bbox was asked for
    result, _ = _expected(served)
    np.testing.assert_allclose([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in dets],
                               [d.box_xyxy for d in result.detections], atol=1e-2)


@pytest.mark.parametrize("field, value, allowed", [("box_format", "yolo", "xyxy, xywh, cxcywh"),
                                                   ("mask_format", "png", "rle, polygon, none"),
                                                   ("tile", "10", "[32, 8192]"), ("iou_thr", 1.5, "(0, 1]"),
                                                   ("tile_overlap", 0.75, "[0, 0.5]"), ("tile_merge", "x", "nms, nmm")])
def test_detserve_grpc_bad_knob_is_invalid_argument(served, field, value, allowed):
    stub = detserve_pb2_grpc.DetectorStub(served.channel)
    options = pb.DetectOptions()
    setattr(options, field, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        served.run(lambda: stub.Detect(pb.DetectRequest(model=MODEL, image=pb.Image(encoded=IMAGE), options=options)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details() and allowed in caught.value.details()


# ---- the Python client ----------------------------------------------------------------------

def test_grpc_client_carries_the_knobs_and_returns_polygons(served):
    from service.client import AsyncDetserveClient

    target = served.target

    async def call():
        async with AsyncDetserveClient(grpc=target) as client:
            return await client.detect(IMAGE, model=MODEL, score_thr=0.05, iou_thr=0.3, class_agnostic=True,
                                       mask_format="polygon", tile="off", tile_overlap=0.25, tile_merge="nmm")

    result = served.run(call)
    got = served.engine.options[-1]
    rounded = {f: round(getattr(got, f), 6) for f in ("score_thr", "iou_thr", "tile_overlap")}
    # box_format / normalized are the caller's to render (protocols/render.py): the client returns xyxy pixels
    assert dataclasses.replace(got, **rounded) == dataclasses.replace(EXPECTED, box_format=None, normalized=None)
    (want,) = served.predictor.predict([EXPECTED_IMAGE], [EXPECTED])
    assert [d.label for d in result.detections] == [d.label for d in want.detections]
    np.testing.assert_allclose([d.box_xyxy for d in result.detections], [d.box_xyxy for d in want.detections], atol=1e-2)
    assert all(d.polygons and d.mask is None for d in result.detections)


def test_tiled_polygons_are_outlines_of_the_merged_masks_in_image_pixels(served):
    """Tiles run with RLE masks and the merged masks are outlined: no tile-pixel or missing polygons."""
    import cv2
    from pycocotools import mask as mask_utils

    def ask(**params):
        response = served.run(lambda: served.http.post(f"/predictions/{MODEL}", params={"tile": "320", **params},
                                                       content=IMAGE))
        assert response.status_code == 200, response.text
        return response.json()

    rle, polygon = ask(), ask(mask_format="polygon")
    assert rle and len(rle) == len(polygon) and all("polygons" in d and "segmentation" not in d for d in polygon)
    for with_rle, with_polygon in zip(rle, polygon):
        seg = with_rle["segmentation"]
        area = float(mask_utils.area({"size": seg["size"], "counts": seg["counts"].encode()}))
        outline = np.asarray(with_polygon["polygons"][0], np.float32).reshape(-1, 2)
        assert abs(cv2.contourArea(outline) - area) <= cv2.arcLength(outline, True) + 4
        x, y, w, h = mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()})
        # inside the merged mask's extent in the image, not in some tile's pixels
        assert outline[:, 0].min() >= x - 1 and outline[:, 1].min() >= y - 1
        assert outline[:, 0].max() <= x + w + 1 and outline[:, 1].max() <= y + h + 1
