"""`detserve predict` through the real CLI on generated images and a temporary model folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from service.cli import main
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector

CLASSES = ["square", "circle"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    folder = store / "shapes"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", len(CLASSES))
    for module in model.modules():  # default init lets activations vanish; keep the scores varied
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    state_dict = model.state_dict()
    for key, value in state_dict.items():
        if key.startswith("bbox_head.rtm_reg.") and key.endswith(".bias"):
            value.fill_(1.5)  # positive distances: boxes with area
    save_checkpoint(folder / "weights.pth", state_dict, CLASSES)
    (folder / "model.toml").write_text('backend = "eager"\narch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 128\n'
                                       'default_score_thr = 0.0\ndevice = "cpu"\n')
    return store


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img = np.full((150, 240, 3), 200, np.uint8)
    cv2.rectangle(img, (30, 40), (90, 110), (20, 20, 220), -1)
    cv2.circle(img, (170, 75), 35, (200, 40, 40), -1)
    path = tmp_path_factory.mktemp("img") / "shapes.jpg"
    cv2.imwrite(str(path), img)
    return path


def test_predict_prints_torchserve_json_with_boxes_inside_the_image(store, image, capsys):
    rc = main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--max-dets", "20"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    detections = json.loads(out[0])
    assert 0 < len(detections) <= 20
    for d in detections:
        assert set(d) == {"class_label", "class_name", "bbox", "score"}
        assert d["class_name"] == CLASSES[d["class_label"]]
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 150
        assert 0.0 <= d["score"] <= 1.0


def test_options_draw_and_several_images(store, image, tmp_path, capsys):
    second = tmp_path / "second.png"
    cv2.imwrite(str(second), np.zeros((64, 48, 3), np.uint8))
    draw = tmp_path / "out.png"
    folder = store / "shapes"  # a folder path works as well as a name
    rc = main(["predict", str(image), str(second), "--model", str(folder), "--score-thr", "0.2",
               "--classes", "circle", "--max-dets", "5", "--draw", str(draw)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    for line in lines:
        dets = json.loads(line)
        assert len(dets) <= 5 and all(d["class_name"] == "circle" and d["score"] >= 0.2 for d in dets)
    first_drawn = cv2.imread(str(tmp_path / "out-shapes.png"))
    second_drawn = cv2.imread(str(tmp_path / "out-second.png"))
    assert first_drawn.shape == (150, 240, 3) and second_drawn.shape == (64, 48, 3)


def test_bad_inputs_report_errors_and_exit_nonzero(store, image, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    rc = main(["predict", str(text), str(image), str(tmp_path / "missing.jpg"), "--model", "shapes",
               "--model-store", str(store)])
    captured = capsys.readouterr()
    assert rc == 1
    assert len(captured.out.strip().splitlines()) == 1  # the good image still printed
    assert "unsupported_media_type" in captured.err and "missing.jpg" in captured.err
    assert main(["predict", str(image), "--model", "nope", "--model-store", str(store)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--classes", "dog"]) == 1
    assert "dog" in capsys.readouterr().err


def test_console_entry_point(store, image):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "service", "predict", str(image), "--model", "shapes", "--model-store", str(store)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
