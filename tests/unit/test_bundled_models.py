"""The shipped models really detect shapes, at original resolutions from 200 px to 4000x3000.

Held-out images come from a seed the training never used; they run through the same Predictor a
worker uses, so this also proves boxes and masks are rescaled back to the original image.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.demo.dataset import CLASSES, render_sample
from service.demo.evaluate import mask_iou
from service.pipeline.predictor import Predictor
from service.settings import load_model_config
from service.types import DetectOptions, EncodedImage

MODELS = Path(__file__).resolve().parents[2] / "models"
HELD_OUT_SEED = 20260101  # training renders from seed 0 only
# (width, height, format): tiny square, both 4000x3000 orientations, a wide mid-size PNG
SIZES = [(200, 200, ".jpg"), (4000, 3000, ".jpg"), (3000, 4000, ".png"), (900, 500, ".png")]
MIN_IOU = 0.7


@pytest.fixture(scope="module")
def held_out():
    rng = np.random.default_rng(HELD_OUT_SEED)
    samples = []
    for width, height, ext in SIZES:
        image, anns = render_sample(rng, width, height, max_shapes=5)
        ok, buf = cv2.imencode(ext, image, [cv2.IMWRITE_JPEG_QUALITY, 92] if ext == ".jpg" else [])
        assert ok
        samples.append((EncodedImage(buf.tobytes()), anns))
    return samples


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _predict(model: str, held_out):
    predictor = Predictor.from_config(load_model_config(MODELS / model), device="cpu")
    try:
        assert predictor.classes == CLASSES
        results = predictor.predict([img for img, _ in held_out], [DetectOptions()] * len(held_out))
    finally:
        predictor.close()
    for result, (width, height, _) in zip(results, SIZES):
        assert not isinstance(result, Exception), result
        assert (result.image_width, result.image_height) == (width, height)
    return results


@pytest.mark.parametrize("model", ["rtmdet", "rtmdet-ins"])
def test_every_shape_is_found_with_its_class(model, held_out):
    results = _predict(model, held_out)
    for result, (_, anns), size in zip(results, held_out, SIZES):
        for ann in anns:
            best = max((_box_iou(ann.box_xyxy, d.box_xyxy) for d in result.detections
                        if d.class_name == CLASSES[ann.label]), default=0.0)
            assert best >= MIN_IOU, f"{size}: {CLASSES[ann.label]} at {ann.box_xyxy} best IoU {best:.2f}"


def test_ins_masks_match_the_ground_truth(held_out):
    results = _predict("rtmdet-ins", held_out)
    for result, (_, anns), size in zip(results, held_out, SIZES):
        for ann in anns:
            candidates = [d for d in result.detections if d.class_name == CLASSES[ann.label]
                          and _box_iou(ann.box_xyxy, d.box_xyxy) >= 0.5]
            assert candidates, f"{size}: no detection for {CLASSES[ann.label]}"
            best = max(mask_iou(mask_utils.decode(d.mask.to_coco()).astype(bool), ann.mask) for d in candidates)
            assert best >= MIN_IOU, f"{size}: {CLASSES[ann.label]} mask IoU {best:.2f}"
            assert candidates[0].mask.height == size[1] and candidates[0].mask.width == size[0]
