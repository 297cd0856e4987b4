"""Every door, unchanged, serving a random-weight Mask R-CNN R-50 (calibrated so it detects) from a real
`detserve serve` with worker processes: TorchServe REST with `segmentation` RLE, KServe V2 REST and
detserve gRPC, all equal to the in-process Predictor."""
from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import cv2
import httpx
import pytest

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from serve_process import ServeProcess  # noqa: E402
from two_stage_fakes import shapes_image, write_two_stage_model  # noqa: E402

MODEL = "mrcnn"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage-doors")
    folder = write_two_stage_model(root / "store", MODEL)
    images = [cv2.imencode(".png", shapes_image(seed))[1].tobytes() for seed in range(2)]
    from service.pipeline.predictor import Predictor
    from service.settings import load_model_config
    from service.types import DetectOptions, EncodedImage

    predictor = Predictor.from_config(load_model_config(folder), threads=1)
    expected = predictor.predict([EncodedImage(i) for i in images], [DetectOptions()] * len(images))
    predictor.close()
    assert all(len(r.detections) > 0 and all(d.mask is not None for d in r.detections) for r in expected)
    srv = ServeProcess(root / "store", root, models=[MODEL], fake=False, grpc=True)
    try:
        srv.wait_ready(180)
        yield srv, images, expected
    finally:
        assert srv.stop() == 0, srv.log()


def _close(box_a, box_b, tol=0.02):
    return all(abs(a - b) <= tol for a, b in zip(box_a, box_b))


def test_torchserve_rest_returns_boxes_and_segmentation_rle(served):
    srv, images, expected = served
    r = httpx.post(f"{srv.url}/predictions/{MODEL}", content=images[0], timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected[0].detections
    assert len(body) == len(want)
    for got, det in zip(body, want):
        assert got["class_name"] == det.class_name and _close(got["bbox"], det.box_xyxy)
        seg = got["segmentation"]
        assert seg["size"] == [det.mask.height, det.mask.width] and seg["counts"] == det.mask.counts


def test_kserve_v2_rest_returns_masks_rle(served):
    srv, images, expected = served
    meta = httpx.get(f"{srv.url}/v2/models/{MODEL}", timeout=10).json()
    assert "masks_rle" in [o["name"] for o in meta["outputs"]]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(i).decode() for i in images]}]}
    r = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json=request, timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    counts = outputs["num_detections"]["data"]
    assert counts == [len(e.detections) for e in expected]
    k = outputs["scores"]["shape"][1]
    for i, result in enumerate(expected):
        rles = outputs["masks_rle"]["data"][i * k:(i + 1) * k]
        for j, det in enumerate(result.detections):
            box = outputs["boxes"]["data"][(i * k + j) * 4:(i * k + j + 1) * 4]
            assert _close(box, det.box_xyxy)
            rle = json.loads(rles[j]) if isinstance(rles[j], str) else rles[j]
            assert rle["counts"] == det.mask.counts


def test_detserve_grpc_returns_masks(served):
    from service.client import DetserveClient

    srv, images, expected = served
    client = DetserveClient(grpc=srv.grpc_target, model=MODEL, retries=0)
    try:
        info = client.model_info(MODEL)
        assert info.has_masks and info.arch == "mask-rcnn-r50-fpn"
        results = client.detect_batch(images)
    finally:
        client.close()
    for got, want in zip(results, expected):
        assert len(got.detections) == len(want.detections)
        for g, w in zip(got.detections, want.detections):
            assert g.class_name == w.class_name and _close(g.box_xyxy, w.box_xyxy)
            assert g.mask is not None and g.mask.counts == w.mask.counts
