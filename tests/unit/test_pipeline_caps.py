"""Per-request score_thr below test_cfg.score_thr works (no silent floor) and max_dets above
test_cfg.max_per_img is refused with a message naming the cap, on a real RTMDet predictor."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector
from service.errors import InvalidRequest
from service.pipeline.predictor import Predictor
from service.settings import load_model_config
from service.types import DetectOptions, EncodedImage


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store") / "floor"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", 3)
    for module in model.modules():  # default init leaves every score tied near 0.5
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    state = model.state_dict()
    for key, value in state.items():
        if key.startswith("bbox_head.rtm_reg.") and key.endswith(".bias"):
            value.fill_(1.5)
        if key.startswith("bbox_head.rtm_cls.") and key.endswith(".weight"):
            value.mul_(30)
    save_checkpoint(folder / "weights.pth", state, ["a", "b", "c"], {"arch": "rtmdet-tiny"})
    (folder / "model.toml").write_text(
        'arch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 128\ndevice = "cpu"\n'
        "default_score_thr = 0.6\n[test_cfg]\nscore_thr = 0.6\nmax_per_img = 40\n")
    p = Predictor.from_config(load_model_config(folder), threads=1)
    yield p
    p.close()


def _jpeg(seed: int = 0) -> EncodedImage:
    img = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return EncodedImage(cv2.imencode(".jpg", cv2.GaussianBlur(img, (7, 7), 2))[1].tobytes())


def test_score_thr_below_the_pre_nms_floor_returns_lower_scores(predictor):
    image = _jpeg()
    (default,) = predictor.predict([image], [DetectOptions()])
    (low,) = predictor.predict([image], [DetectOptions(score_thr=0.01)])
    assert all(d.score >= 0.6 for d in default.detections)
    below = [d.score for d in low.detections if d.score < 0.6]
    assert below and min(below) >= 0.01  # on main these were cut by test_cfg.score_thr = 0.6
    assert len(low.detections) <= 40


def test_a_low_threshold_batch_mate_does_not_change_the_others(predictor):
    image = _jpeg(1)
    (alone,) = predictor.predict([image], [DetectOptions(score_thr=0.52)])
    together, _ = predictor.predict([image, image], [DetectOptions(score_thr=0.52), DetectOptions(score_thr=0.0)])
    assert [(d.label, round(d.score, 5)) for d in alone.detections] == \
        [(d.label, round(d.score, 5)) for d in together.detections]


def test_max_dets_above_max_per_img_is_refused_naming_the_cap(predictor):
    over, at_cap = predictor.predict([_jpeg(), _jpeg()], [DetectOptions(max_dets=41), DetectOptions(max_dets=40)])
    assert isinstance(over, InvalidRequest) and "max_per_img" in over.message and "40" in over.message
    assert not isinstance(at_cap, InvalidRequest)
