"""Two-stage detectors end to end on small real images: well-formed detections, batching equivalence
(the RoI heads run over all images at once), mask RLEs against mmdet's dense paste, bounded mask memory."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pydantic import ValidationError

from service.detectors.two_stage import TwoStageTestConfig, build, predict
from service.detectors.two_stage.decode import paste_masks_rle
from two_stage_fakes import SMALL_SCALE, detecting_model, shapes_image

# fewer RoIs than mmdet's 1000 / 100 keep the default suite fast on 2 cores; the code path is the same
FAST_CFG = TwoStageTestConfig(rpn={"max_per_img": 150}, max_per_img=30)
MASK_CFG = TwoStageTestConfig(rpn={"max_per_img": 150}, max_per_img=5)  # the mask head dominates on CPU


@pytest.fixture(scope="module")
def images():
    return [shapes_image(seed) for seed in range(4)]  # 160x128 BGR


@pytest.fixture(scope="module")
def faster(images):
    return detecting_model("faster-rcnn-r50-fpn", images)


@pytest.fixture(scope="module")
def mask(images):
    return detecting_model("mask-rcnn-r50-fpn", images)


def decoded(rle) -> np.ndarray:
    return mask_utils.decode({"size": [rle.height, rle.width], "counts": rle.counts.encode("ascii")}).astype(bool)


def assert_same_detections(a, b, box_tol=0.01):
    assert a.labels.tolist() == b.labels.tolist()
    assert (a.boxes_xyxy - b.boxes_xyxy).abs().max().item() <= box_tol
    # batched convs pick other kernels; fc_cls x20 turns their float noise into ~1e-5 in the softmax
    assert (a.scores - b.scores).abs().max().item() <= 1e-4


def test_faster_rcnn_detections_are_well_formed(faster, images):
    (det,) = predict(faster, [images[0]], FAST_CFG, scale=SMALL_SCALE)
    n = det.scores.shape[0]
    assert 0 < n <= FAST_CFG.max_per_img
    assert det.boxes_xyxy.shape == (n, 4) and det.boxes_xyxy.dtype == torch.float32
    assert det.labels.dtype == torch.int64 and int(det.labels.max()) < 80
    assert bool((det.scores > FAST_CFG.score_thr).all()) and bool((det.scores[:-1] >= det.scores[1:]).all())
    h, w = images[0].shape[:2]
    b = det.boxes_xyxy
    assert bool((b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all())
    assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all())
    assert det.masks is None


def test_boxes_come_back_in_original_pixels(faster, images):
    """An image upscaled 1.5x by the transform yields boxes in its own pixels, not the resized ones."""
    small = images[0][::2, ::2].copy()  # 80x64 -> resized to 160x128 at SMALL_SCALE
    (det,) = predict(faster, [small], FAST_CFG, scale=SMALL_SCALE)
    assert det.scores.numel() > 0
    assert float(det.boxes_xyxy[:, 2].max()) <= 80 + 1e-3 and float(det.boxes_xyxy[:, 3].max()) <= 64 + 1e-3


@pytest.mark.parametrize("family", ["faster", "mask"])
def test_a_batch_of_four_equals_four_single_calls(family, request, images):
    model = request.getfixturevalue(family)
    cfg = MASK_CFG if family == "mask" else FAST_CFG
    batch = predict(model, images, cfg, scale=SMALL_SCALE)
    for image, batched in zip(images, batch):
        (single,) = predict(model, [image], cfg, scale=SMALL_SCALE)
        assert single.scores.numel() > 0
        assert_same_detections(single, batched)
        if family == "mask":
            assert any(decoded(m).any() for m in single.masks)
            assert [m.counts for m in single.masks] == [m.counts for m in batched.masks]


def test_mixed_sizes_are_batched_by_padded_shape_and_equal_single_calls(faster, images):
    wide = np.ascontiguousarray(images[1][:64])  # 160x64: pads to 160x64 alone, to 160x128 next to a 160x128
    mixed = [images[0], wide, images[2]]
    grouped = predict(faster, mixed, FAST_CFG, scale=SMALL_SCALE)
    for image, batched in zip(mixed, grouped):
        (single,) = predict(faster, [image], FAST_CFG, scale=SMALL_SCALE)
        assert_same_detections(single, batched)
    assert float(grouped[1].boxes_xyxy[:, 3].max()) <= 64 + 1e-3
    # one shared padding keeps each image's geometry, though border features change (spec pitfall 19)
    shared = predict(faster, mixed, FAST_CFG, scale=SMALL_SCALE, group_by_padded_shape=False)
    assert float(shared[1].boxes_xyxy[:, 3].max()) <= 64 + 1e-3


def test_mask_rcnn_masks_are_rles_inside_their_boxes(mask, images):
    (det,) = predict(mask, [images[2]], MASK_CFG, scale=SMALL_SCALE)
    h, w = images[2].shape[:2]
    assert det.masks is not None and len(det.masks) == det.scores.numel() > 0
    filled = [decoded(m).mean() for m in det.masks]
    assert max(filled) > 0 and min(filled) < 1
    for rle, box in zip(det.masks, det.boxes_xyxy.tolist()):
        m = decoded(rle)
        assert m.shape == (h, w)
        ys, xs = np.nonzero(m)
        if xs.size:  # the paste window reaches 1 px past the box
            assert xs.min() >= np.floor(box[0]) - 1 and xs.max() < np.ceil(box[2]) + 1
            assert ys.min() >= np.floor(box[1]) - 1 and ys.max() < np.ceil(box[3]) + 1


def dense_paste(probs: torch.Tensor, boxes: torch.Tensor, h: int, w: int, thr: float) -> np.ndarray:
    """mmdet's GPU-path `_do_paste_mask` (skip_empty=False): every pixel of the image sampled at once."""
    x0, y0, x1, y1 = boxes.split(1, dim=1)
    img_y = (torch.arange(h).float() + 0.5 - y0) / (y1 - y0) * 2 - 1
    img_x = (torch.arange(w).float() + 0.5 - x0) / (x1 - x0) * 2 - 1
    n = boxes.shape[0]
    grid = torch.stack([img_x[:, None, :].expand(n, h, w), img_y[:, :, None].expand(n, h, w)], dim=3)
    return (F.grid_sample(probs[:, None], grid, align_corners=False)[:, 0] >= thr).numpy()


def test_banded_windowed_paste_equals_the_dense_paste():
    g = torch.Generator().manual_seed(0)
    h, w, n = 150, 210, 40
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 10.0, h - 10.0]) - 5  # some cross the border
    boxes = torch.cat([xy, xy + 2 + torch.rand(n, 2, generator=g) * 120], 1)
    expected = dense_paste(probs, boxes, h, w, 0.5)
    # a tiny band budget forces many bands per instance
    for band_bytes in (64 * 1024, 16 * 1024 * 1024):
        got = np.stack([decoded(r) for r in paste_masks_rle(probs, boxes, (h, w), 0.5, band_bytes)])
        assert np.array_equal(got, expected)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_masks_of_100_instances_on_a_4000x3000_image_stay_under_300_mb():
    """Peak RSS above the starting RSS while pasting and encoding (dense bool masks alone would be 1.2 GB)."""
    g = torch.Generator().manual_seed(0)
    h, w, n = 3000, 4000, 100
    probs = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
    boxes = torch.cat([xy, xy + 500 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])], 1)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pytest.skip("peak RSS cannot be reset here")
    before = _rss("VmRSS:")
    rles = paste_masks_rle(probs, boxes, (h, w), 0.5, TwoStageTestConfig().mask_band_bytes)
    extra = _rss("VmHWM:") - before
    assert len(rles) == n and all((r.height, r.width) == (h, w) for r in rles)
    assert extra < 300 * 1024 * 1024, f"extra peak {extra / 2**20:.0f} MiB"


def test_an_untrained_model_returns_empty_results_of_the_right_types(images):
    torch.manual_seed(0)
    model = build("mask-rcnn-r50-fpn")  # default init: every class score is ~1/81 < 0.05
    (det,) = predict(model, [images[0]], FAST_CFG, scale=SMALL_SCALE)
    assert det.boxes_xyxy.shape == (0, 4) and det.scores.shape == (0,) and det.labels.dtype == torch.int64
    assert det.masks == []


def test_export_entry_forward_returns_rois_and_rcnn_outputs(faster, images):
    from service.detectors.two_stage.transforms import preprocess

    inputs, metas = preprocess(images[:2], SMALL_SCALE)
    with torch.inference_mode():
        rois, cls_logits, deltas = faster(inputs, [m.img_shape for m in metas], FAST_CFG.rpn)
    assert rois.shape[1] == 5 and set(rois[:, 0].tolist()) == {0.0, 1.0}
    assert cls_logits.shape == (rois.shape[0], 81) and deltas.shape == (rois.shape[0], 320)


def test_test_cfg_values_are_bounded_and_named():
    with pytest.raises(ValidationError, match="max_per_img"):
        TwoStageTestConfig(max_per_img=10**6)
    with pytest.raises(ValidationError, match="nms_pre"):
        TwoStageTestConfig(rpn={"nms_pre": 0})
    with pytest.raises(ValidationError, match="extra"):
        TwoStageTestConfig(score_threshold=0.3)
