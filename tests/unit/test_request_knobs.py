"""Issue 18's per-request knobs inside the worker: iou_thr and class_agnostic re-do the final NMS per
image (equal to a model configured that way, whatever the batch-mates asked), mask_format=none skips
the paste, mask_format=polygon returns outlines of the same masks. Both families, real predictors."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.pipeline.predictor import Predictor
from service.settings import BackendKind, ModelConfig, load_model_config
from service.types import DetectOptions, DetectResult, EncodedImage, MaskFormat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from two_stage_fakes import shapes_image, write_two_stage_model  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "models"
LOW = 0.01  # score floor low enough that many overlapping candidates reach the final NMS


def _eager(cfg: ModelConfig, **test_cfg) -> ModelConfig:
    return cfg.model_copy(update={"backend": BackendKind.EAGER, "device": "cpu",
                                  "test_cfg": cfg.test_cfg.model_copy(update=test_cfg)})


def _load(cfg: ModelConfig) -> Predictor:
    return Predictor.from_config(cfg, threads=1)


def _boxes(result: DetectResult) -> list[tuple]:
    return [(d.label, round(d.score, 5), tuple(round(v, 3) for v in d.box_xyxy)) for d in result.detections]


def _close(a: DetectResult, b: DetectResult) -> bool:
    """Equal up to float noise: a batched convolution may round differently from a single one."""
    return len(a.detections) == len(b.detections) and all(
        x.label == y.label and abs(x.score - y.score) < 1e-4 and np.allclose(x.box_xyxy, y.box_xyxy, atol=1e-2)
        for x, y in zip(a.detections, b.detections))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


@pytest.fixture(scope="module")
def demo_images():
    demo = (MODELS / "rtmdet" / "demo.jpg").read_bytes()
    pixels = cv2.imdecode(np.frombuffer(demo, np.uint8), cv2.IMREAD_COLOR)
    flipped = cv2.imencode(".png", pixels[:, ::-1])[1].tobytes()
    return [EncodedImage(demo), EncodedImage(flipped)]


@pytest.fixture(scope="module")
def rtmdet_cfg():
    return _eager(load_model_config(MODELS / "rtmdet"))


@pytest.fixture(scope="module")
def rtmdet(rtmdet_cfg):
    predictor = _load(rtmdet_cfg)
    yield predictor
    predictor.close()


def test_iou_thr_equals_a_model_configured_with_that_iou(rtmdet, rtmdet_cfg, demo_images):
    strict = _load(_eager(rtmdet_cfg, iou_threshold=0.2))
    try:
        for image in demo_images:
            (asked,) = rtmdet.predict([image], [DetectOptions(score_thr=LOW, iou_thr=0.2)])
            (configured,) = strict.predict([image], [DetectOptions(score_thr=LOW)])
            (default,) = rtmdet.predict([image], [DetectOptions(score_thr=LOW)])
            assert _boxes(asked) == _boxes(configured)
            assert len(asked.detections) < len(default.detections)  # the knob changed something
    finally:
        strict.close()


def test_class_agnostic_equals_a_model_configured_class_agnostic(rtmdet, rtmdet_cfg, demo_images):
    agnostic = _load(_eager(rtmdet_cfg, class_agnostic=True))
    try:
        (asked,) = rtmdet.predict([demo_images[0]], [DetectOptions(score_thr=LOW, class_agnostic=True)])
        (configured,) = agnostic.predict([demo_images[0]], [DetectOptions(score_thr=LOW)])
        (per_class,) = rtmdet.predict([demo_images[0]], [DetectOptions(score_thr=LOW)])
        (back,) = agnostic.predict([demo_images[0]], [DetectOptions(score_thr=LOW, class_agnostic=False)])
    finally:
        agnostic.close()
    assert _boxes(asked) == _boxes(configured) and _boxes(back) == _boxes(per_class)
    assert len(asked.detections) < len(per_class.detections)
    w, h = asked.image_width, asked.image_height
    # Boxes are clipped to the image after NMS, which can raise their overlap: check the inner ones.
    dets = [d for d in asked.detections if 0 < d.box_xyxy[0] and 0 < d.box_xyxy[1]
            and d.box_xyxy[2] < w and d.box_xyxy[3] < h]
    assert len({d.label for d in dets}) > 1
    thr = rtmdet_cfg.test_cfg.iou_threshold
    # no survivor overlaps a better one beyond the threshold, whatever their classes
    assert all(_iou(a.box_xyxy, b.box_xyxy) <= thr + 1e-4 for i, a in enumerate(dets) for b in dets[i + 1:])


def test_a_batch_with_different_nms_knobs_equals_each_request_alone(rtmdet, demo_images):
    options = [DetectOptions(score_thr=LOW, iou_thr=0.2), DetectOptions(score_thr=0.5),
               DetectOptions(score_thr=LOW, class_agnostic=True, iou_thr=0.9), DetectOptions()]
    images = [demo_images[0], demo_images[1], demo_images[1], demo_images[0]]
    batched = rtmdet.predict(images, options)
    for image, opts, result in zip(images, options, batched):
        (alone,) = rtmdet.predict([image], [opts])
        assert _close(result, alone)


@pytest.fixture(scope="module")
def rtmdet_ins():
    predictor = _load(_eager(load_model_config(MODELS / "rtmdet-ins")))
    yield predictor
    predictor.close()


def test_mask_format_none_skips_masks_and_polygon_outlines_the_same_masks(rtmdet_ins):
    image = EncodedImage((MODELS / "rtmdet-ins" / "demo.jpg").read_bytes())
    rle, none, polygon = rtmdet_ins.predict(
        [image] * 3, [DetectOptions(), DetectOptions(mask_format=MaskFormat.NONE),
                      DetectOptions(mask_format=MaskFormat.POLYGON)])
    assert rle.detections and all(d.mask is not None and d.polygons is None for d in rle.detections)
    assert _boxes(none) == _boxes(rle) == _boxes(polygon)
    assert all(d.mask is None and d.polygons is None for d in none.detections)
    assert all(d.mask is None and d.polygons for d in polygon.detections)
    assert "segmentation" not in none.detections[0].to_torchserve()
    assert "polygons" in polygon.detections[0].to_torchserve()
    for with_rle, with_polygon in zip(rle.detections, polygon.detections):
        area = float(mask_utils.area(with_rle.mask.to_coco() | {"counts": with_rle.mask.counts.encode()}))
        outline = np.asarray(with_polygon.polygons[0], np.float32).reshape(-1, 2)
        # the outline runs through border-pixel centres shifted by half a pixel: area within a perimeter
        assert abs(cv2.contourArea(outline) - area) <= cv2.arcLength(outline, True) + 4
        x, y, w, h = mask_utils.toBbox(with_rle.mask.to_coco() | {"counts": with_rle.mask.counts.encode()})
        assert abs(outline[:, 0].min() - x) <= 1 and abs(outline[:, 0].max() - (x + w)) <= 1
        assert abs(outline[:, 1].min() - y) <= 1 and abs(outline[:, 1].max() - (y + h)) <= 1


def test_mask_format_none_is_cheaper_than_pasting(rtmdet_ins):
    """Not a benchmark: the paste must really be skipped, which shows in the postprocess stage time."""
    image = EncodedImage((MODELS / "rtmdet-ins" / "demo.jpg").read_bytes())
    rtmdet_ins.predict([image], [DetectOptions()])  # warm-up

    def post(opts):
        return min(rtmdet_ins.predict([image], [opts])[0].times.postprocess for _ in range(2))

    assert post(DetectOptions(score_thr=0.0, mask_format=MaskFormat.NONE)) < post(DetectOptions(score_thr=0.0))


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    folder = write_two_stage_model(tmp_path_factory.mktemp("knobs-2s"), "mrcnn", max_per_img=100)
    cfg = _eager(load_model_config(folder))
    predictor = _load(cfg)
    images = [EncodedImage(cv2.imencode(".png", shapes_image(seed))[1].tobytes()) for seed in range(2)]
    yield predictor, cfg, images
    predictor.close()


def test_two_stage_multiclass_nms_takes_the_image_setting_as_a_configured_one():
    """The fast half of the two-stage check (the whole-model one below is slow on CPU)."""
    import torch

    from service.detectors.base import ImageNms
    from service.detectors.two_stage.config import TwoStageTestConfig
    from service.detectors.two_stage.decode import multiclass_nms

    rng = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 1, 2, generator=rng) * 100
    boxes = torch.cat([corners, corners + 10 + torch.rand(60, 1, 2, generator=rng) * 30], dim=-1).expand(60, 3, 4)
    boxes = boxes + torch.rand(60, 3, 4, generator=rng) * 6  # each class's copy of a box shifted a little
    scores = torch.rand(60, 3, generator=rng)

    def run(cfg, nms=None):
        out_boxes, out_scores, labels = multiclass_nms(boxes.clone(), scores, cfg, nms)
        return out_boxes.tolist(), out_scores.tolist(), labels.tolist()

    default = TwoStageTestConfig(iou_threshold=0.5)
    assert run(default, ImageNms(0.2)) == run(TwoStageTestConfig(iou_threshold=0.2)) != run(default)
    agnostic = run(default, ImageNms(0.5, class_agnostic=True))
    assert len(agnostic[0]) < len(run(default)[0])
    # class-agnostic is the same NMS with every box in one class
    same_class = multiclass_nms(boxes.reshape(-1, 1, 4), scores.reshape(-1, 1), default)
    assert torch.equal(same_class[0], torch.tensor(agnostic[0])) and torch.equal(same_class[1], torch.tensor(agnostic[1]))


@pytest.mark.slow
def test_two_stage_iou_thr_and_class_agnostic_equal_configured_models_in_any_batch(two_stage):
    predictor, cfg, images = two_stage
    none = MaskFormat.NONE  # the masks follow the kept boxes; skipping their paste keeps this test quick
    batched = predictor.predict(images, [DetectOptions(iou_thr=0.2, mask_format=none),
                                         DetectOptions(class_agnostic=True, mask_format=none)])
    default = predictor.predict(images, [DetectOptions(mask_format=none)] * 2)
    strict, agnostic = _load(_eager(cfg, iou_threshold=0.2)), _load(_eager(cfg, class_agnostic=True))
    try:
        (want_strict,) = strict.predict([images[0]], [DetectOptions(mask_format=none)])
        (want_agnostic,) = agnostic.predict([images[1]], [DetectOptions(mask_format=none)])
    finally:
        strict.close()
        agnostic.close()
    assert _close(batched[0], want_strict) and len(want_strict.detections) < len(default[0].detections)
    assert _close(batched[1], want_agnostic) and len(want_agnostic.detections) < len(default[1].detections)


@pytest.mark.slow
def test_two_stage_mask_formats(two_stage):
    predictor, _, images = two_stage
    rle, none, polygon = predictor.predict([images[0]] * 3, [DetectOptions(), DetectOptions(mask_format=MaskFormat.NONE),
                                                             DetectOptions(mask_format=MaskFormat.POLYGON)])
    assert rle.detections and _boxes(rle) == _boxes(none) == _boxes(polygon)
    assert all(d.mask is None and d.polygons is None for d in none.detections)
    assert all(d.mask is None for d in polygon.detections)
    assert any(d.polygons for d in polygon.detections)
