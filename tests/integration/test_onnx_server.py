"""`detserve serve` with model folders set to backend = "onnxruntime" (network-only and end2end):
/predictions answers within the parity bounds of the eager backend run in-process."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import httpx
import pytest
import torch

from service.cli import main
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector
from service.export.parity import MAX_BOX_DIFF_PX, MAX_SCORE_DIFF, calibrate_random_head, compare_results, shape_images
from service.pipeline.predictor import Predictor
from service.settings import load_model_config
from service.types import DetectOptions, DetectResult, Detection, EncodedImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_process import ServeProcess  # noqa: E402

# Two exports plus a server with spawned workers: 20 s on an idle box, minutes on a busy one.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ["circle", "square", "triangle"]


def eager_model(folder: Path) -> None:
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", len(CLASSES))
    calibrate_random_head(model, 320)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "weights.pth", model.state_dict(), CLASSES)
    (folder / "model.toml").write_text('backend = "eager"\narch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 320\ndevice = "cpu"\n'
                                       "default_score_thr = 0.3\n[workers]\ncount = 1\nthreads = 1\n")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx-serve")
    eager_model(root / "eager")
    for name, extra in (("onnx", []), ("onnx-e2e", ["--end2end"])):
        shutil.copytree(root / "eager", root / name)
        assert main(["export", str(root / name), "--parity-images", "0", "--set-default", *extra]) == 0
    return root


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    srv = ServeProcess(store, tmp_path_factory.mktemp("onnx-serve-log"), models=["onnx", "onnx-e2e"], fake=False)
    try:
        srv.wait_ready(180)
        yield srv.url
    finally:
        srv.stop()


@pytest.mark.parametrize("model", ["onnx", "onnx-e2e"])
def test_predictions_match_eager_backend(store, server, model):
    images = [cv2.imencode(".png", img)[1].tobytes() for img in shape_images(4, seed=4)]
    eager = Predictor.from_config(load_model_config(store / "eager"))
    try:
        expected = eager.predict([EncodedImage(b) for b in images], [DetectOptions()] * len(images))
    finally:
        eager.close()
    assert sum(len(r.detections) for r in expected) >= 3
    for body, want in zip(images, expected):
        response = httpx.put(f"{server}/predictions/{model}", content=body, timeout=60)
        assert response.status_code == 200, response.text
        got = response.json()
        served = DetectResult([Detection(CLASSES.index(d["class_name"]), d["class_name"], d["score"], tuple(d["bbox"]))
                               for d in got], want.image_width, want.image_height)
        # Matched one to one as the parity gate matches (the random head's many near-equal scores may
        # swap neighbours in the sorted list, so the order is not compared).
        report = compare_results([want], [served], score_thr=0.0)
        assert report.unmatched == [] and report.matched == len(want.detections) == len(got)
        assert report.max_box_diff <= MAX_BOX_DIFF_PX and report.max_score_diff <= MAX_SCORE_DIFF
