"""The /labelstudio/{model} routes on the real inference app, over a small in-test engine."""
from __future__ import annotations

import asyncio
import base64

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from service.errors import InvalidImage, ModelNotFound, Overloaded
from service.protocols.labelstudio.brush import brush_rle_to_mask
from service.protocols.rest.app import build_inference_app
from service.settings import AuthSettings, LabelStudioSettings, ServerSettings
from service.types import BatchSettings, Detection, DetectResult, EncodedImage, ModelInfo, RLEMask

RECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Blob" predicted_values="blob"/></RectangleLabels></View>"""
BRUSH_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="blob"/></BrushLabels></View>"""


class BlobEngine:
    """Finds the bright pixels of an image: one 'blob' detection (box + mask) and an unmapped 'noise'."""

    def __init__(self, has_masks=True, ready=True, fail_with=None):
        self.info = ModelInfo(name="blobs", version="blobs-1a2b3c4d", arch="fake", backend="fake",
                              classes=("blob", "noise"), input_size=64, has_masks=has_masks, ready=ready,
                              batch=BatchSettings(), default_score_thr=0.3)
        self.fail_with = fail_with
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0

    def model_info(self, model):
        if model != self.info.name:
            raise ModelNotFound(f"model '{model}' not found")
        return self.info

    def model_ready(self, model):
        return self.model_info(model).ready

    async def detect(self, model, images, options, *, protocol=None, request_id=None, timeout_s=None):
        self.model_info(model)
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)  # long enough for every task of a call to arrive
            if self.fail_with:
                raise self.fail_with
            return [self._detect(image, options) for image in images]
        finally:
            self.in_flight -= 1

    def _detect(self, image: EncodedImage, options) -> DetectResult:
        pixels = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise InvalidImage("cannot decode image")
        mask = (pixels > 128).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        h, w = pixels.shape
        rle = mask_utils.encode(np.asfortranarray(mask))
        dets = [
            Detection(0, "blob", 0.9, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                      RLEMask(h, w, rle["counts"].decode())),
            Detection(1, "noise", 0.8, (0.0, 0.0, 1.0, 1.0), None),
        ]
        dets = [d for d in dets if options.classes is None or d.class_name in options.classes]
        return DetectResult(dets, image_width=w, image_height=h, model_name="blobs", model_version=self.info.version)


def png_data_uri(w: int, h: int, box: tuple[int, int, int, int]) -> str:
    img = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    ok, buf = cv2.imencode(".png", img)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def client_for(engine, **settings) -> TestClient:
    return TestClient(build_inference_app(engine, ServerSettings(**settings)))


@pytest.fixture(autouse=True)
def no_ls_env(monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                 "LOCAL_FILES_DOCUMENT_ROOT", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)


def predict_body(tasks, config=RECT_CONFIG):
    return {"tasks": tasks, "project": "1.1795314759", "label_config": config,
            "params": {"login": None, "password": None, "context": None}}


def test_health_setup_versions_metrics_webhook():
    client = client_for(BlobEngine())
    health = client.get("/labelstudio/blobs/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    setup = client.post("/labelstudio/blobs/setup", json={
        "project": "1.1795314759", "schema": RECT_CONFIG, "hostname": "http://localhost:8089",
        "access_token": "abc", "extra_params": None})
    assert setup.status_code == 200 and setup.json() == {"model_version": "blobs-1a2b3c4d"}
    assert client.get("/labelstudio/blobs/versions").json() == {"versions": ["blobs-1a2b3c4d"]}
    assert client.get("/labelstudio/blobs/metrics").json() == {}
    other = client.post("/labelstudio/blobs/webhook", json={"action": "TASKS_CREATED", "tasks": [], "project": {}})
    assert (other.status_code, other.json()) == (200, {"status": "Unknown event"})
    train = client.post("/labelstudio/blobs/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert train.status_code == 201 and train.json()["status"] == "ok"


def test_unknown_model_not_ready_and_unusable_config():
    client = client_for(BlobEngine())
    assert client.get("/labelstudio/nope/health").status_code == 404
    assert client.post("/labelstudio/nope/predict", json=predict_body([])).status_code == 404
    assert client_for(BlobEngine(ready=False)).get("/labelstudio/blobs/health").status_code == 503
    bad = client.post("/labelstudio/blobs/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$x'/></View>"})
    assert bad.status_code == 400 and "BrushLabels" in bad.json()["message"]
    boxes_only = client_for(BlobEngine(has_masks=False)).post("/labelstudio/blobs/predict",
                                                              json=predict_body([], BRUSH_CONFIG))
    assert boxes_only.status_code == 400 and "predicts boxes only" in boxes_only.json()["message"]
    assert client.post("/labelstudio/blobs/predict", content=b"{not json").status_code == 400
    assert client.post("/labelstudio/blobs/predict", json={"tasks": "x", "label_config": RECT_CONFIG}).status_code == 400


def test_predict_boxes_one_item_per_task_in_order_and_batched_together():
    engine = BlobEngine()
    boxes = [(10 + i, 5, 40 + 2 * i, 30) for i in range(12)]
    tasks = [{"id": i + 1, "data": {"image": png_data_uri(80, 50, box)}} for i, box in enumerate(boxes)]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == len(tasks)
    assert engine.max_in_flight == len(tasks)  # all tasks reached the engine together
    for box, item in zip(boxes, results):
        assert item["model_version"] == "blobs-1a2b3c4d" and item["score"] == 0.9
        (region,) = item["result"]  # 'noise' has no label: dropped
        assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"] == ["Blob"]
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (80, 50, 0)
        v = region["value"]
        back = (v["x"] * 0.8, v["y"] * 0.5, (v["x"] + v["width"]) * 0.8, (v["y"] + v["height"]) * 0.5)
        assert back == pytest.approx(box)


def test_predict_brush_masks_and_config_from_setup():
    client = client_for(BlobEngine())
    client.post("/labelstudio/blobs/setup", json={"project": "7.1", "schema": BRUSH_CONFIG})
    task = {"id": 3, "data": {"image": png_data_uri(40, 30, (5, 6, 25, 20))}}
    resp = client.post("/labelstudio/blobs/predict", json={"tasks": [task], "project": "7.1"})  # no label_config
    (region,) = resp.json()["results"][0]["result"]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    mask = brush_rle_to_mask(region["value"]["rle"], 30, 40)
    assert (mask > 0).sum() == 20 * 14 and mask[6:20, 5:25].all()


def test_unfetchable_task_gets_empty_result_others_predicted(tmp_path, monkeypatch, caplog):
    (tmp_path / "ok.png").write_bytes(base64.b64decode(png_data_uri(20, 20, (2, 2, 10, 10)).split(",")[1]))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=ok.png"}},
        {"id": 2, "data": {"image": "/data/upload/1/missing.png"}},  # no LABEL_STUDIO_URL
        {"id": 3, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},  # not an image
        {"id": 4, "data": {"other": "x"}},
        {"id": 5, "data": {"image": "http://127.0.0.1:9/down.png"}},
    ]
    resp = client_for(BlobEngine()).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results[0]["result"]) == 1
    assert [r["result"] for r in results[1:]] == [[], [], [], []]
    assert all(r["model_version"] == "blobs-1a2b3c4d" for r in results)
    logged = caplog.text
    assert "task 2" in logged and "LABEL_STUDIO_URL is not set" in logged
    assert "task 3" in logged and "task 4" in logged and "task 5" in logged


def test_engine_trouble_fails_the_call_instead_of_storing_empty_predictions():
    engine = BlobEngine(fail_with=Overloaded("queue full", retry_after_s=2))
    tasks = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "2"


def test_basic_auth_from_settings_or_env(monkeypatch):
    client = client_for(BlobEngine(), labelstudio=LabelStudioSettings(basic_auth_user="ls", basic_auth_pass="pw"))
    denied = client.get("/labelstudio/blobs/health")
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/labelstudio/blobs/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/labelstudio/blobs/health", auth=("ls", "pw")).status_code == 200
    monkeypatch.setenv("BASIC_AUTH_USER", "envuser")
    monkeypatch.setenv("BASIC_AUTH_PASS", "envpass")
    env_client = client_for(BlobEngine())
    assert env_client.get("/labelstudio/blobs/health").status_code == 401
    assert env_client.get("/labelstudio/blobs/health", auth=("envuser", "envpass")).status_code == 200


def test_bearer_tokens_are_not_asked_of_label_studio():
    client = client_for(BlobEngine(), auth=AuthSettings(inference_tokens=["secret"]))
    assert client.get("/labelstudio/blobs/health").status_code == 200


def test_settings_beat_env_and_setup_fills_the_gaps(monkeypatch, tmp_path):
    from service.protocols.labelstudio.backend import ProjectSetup, fetch_config

    setup = ProjectSetup(label_config=None, hostname="http://localhost:8080", access_token="from-setup")
    assert (fetch_config(ServerSettings(), setup).url, fetch_config(ServerSettings(), setup).api_key) == (
        "http://localhost:8080", "from-setup")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls-env:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "env-key")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    env = fetch_config(ServerSettings(), setup)
    assert (env.url, env.api_key, env.document_root) == ("http://ls-env:8080", "env-key", tmp_path)
    configured = fetch_config(ServerSettings(labelstudio=LabelStudioSettings(url="http://ls-conf", api_key="conf")))
    assert (configured.url, configured.api_key) == ("http://ls-conf", "conf")
