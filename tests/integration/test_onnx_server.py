"""`detserve serve` with model folders set to backend = "onnxruntime" (network-only and end2end):
/predictions answers within the parity bounds of the eager backend run in-process."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import pytest
import torch

from service.cli import main
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector
from service.export.parity import MAX_BOX_DIFF_PX, MAX_SCORE_DIFF, calibrate_random_head, shape_images
from service.pipeline.predictor import Predictor
from service.settings import load_model_config
from service.types import DetectOptions, EncodedImage

# Two exports plus a server with spawned workers: 20 s on an idle box, minutes on a busy one.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

DETSERVE = str(Path(sys.executable).with_name("detserve"))
CLASSES = ["circle", "square", "triangle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eager_model(folder: Path) -> None:
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", len(CLASSES))
    calibrate_random_head(model, 320)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "weights.pth", model.state_dict(), CLASSES)
    (folder / "model.toml").write_text('arch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 320\ndevice = "cpu"\n'
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
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    log_path = tmp_path_factory.mktemp("onnx-serve-log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DETSERVE_PREDICTOR_FACTORY", None)
    cmd = [DETSERVE, "serve", "--model-store", str(store), "--models", "onnx,onnx-e2e", "--host", "127.0.0.1",
           "--no-grpc", "--inference-port", str(ports["inference"]), "--management-port", str(ports["management"]),
           "--metrics-port", str(ports["metrics"])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ports['inference']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


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
        assert [d["class_name"] for d in got] == [d.class_name for d in want.detections]
        for g, w in zip(got, want.detections):
            assert max(abs(a - b) for a, b in zip(g["bbox"], w.box_xyxy)) <= MAX_BOX_DIFF_PX
            assert abs(g["score"] - w.score) <= MAX_SCORE_DIFF
