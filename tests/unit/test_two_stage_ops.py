"""Two-stage building blocks against the spec's checkable facts: anchors, box coder, RoI levels, mmcv NMS,
and the test-pipeline transform with its inverse."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.detectors.two_stage.box_ops import RCNN_STDS, RPN_STDS, batched_nms, bbox2delta, delta2bbox, nms_mmcv
from service.detectors.two_stage.roi_head import map_roi_levels
from service.detectors.two_stage.rpn import base_anchors, grid_anchors, num_anchors_total
from service.detectors.two_stage.transforms import (
    MEAN_RGB, STD_RGB, Rescale, TwoStageMeta, boxes_to_original, boxes_to_resized, pad_batch, padded_shape,
    preprocess, resize_image,
)
from service.errors import InvalidImage


# --- anchors (spec §2.3)

def test_base_anchors_are_unrounded_and_ratio_ordered():
    s4 = base_anchors(4)
    expected = torch.tensor([[-22.627417, -11.313708, 22.627417, 11.313708], [-16, -16, 16, 16],
                             [-11.313708, -22.627417, 11.313708, 22.627417]])
    assert torch.allclose(s4, expected, atol=1e-5)
    s64 = base_anchors(64)
    assert torch.allclose(s64[0], torch.tensor([-362.03867, -181.01933, 362.03867, 181.01933]), atol=1e-4)
    areas = (s4[:, 2] - s4[:, 0]) * (s4[:, 3] - s4[:, 1])
    assert torch.allclose(areas, torch.full((3,), 32.0 ** 2), rtol=1e-5)


def test_grid_anchors_sit_on_cell_corners_row_major():
    anchors = grid_anchors((2, 3), 8)  # H=2, W=3
    assert anchors.shape == (2 * 3 * 3, 4)
    base = base_anchors(8)
    i, j, a = 1, 2, 0
    assert torch.equal(anchors[(i * 3 + j) * 3 + a], base[a] + torch.tensor([j * 8.0, i * 8.0, j * 8.0, i * 8.0]))


@pytest.mark.parametrize("padded_hw,total", [((800, 1088), 217_413), ((1216, 800), 242_991), ((768, 1344), 257_796),
                                             ((800, 800), 159_882), ((288, 1344), 96_705)])
def test_anchor_totals_match_the_spec_table(padded_hw, total):
    assert num_anchors_total(padded_hw) == total


# --- box coder (spec §2.5)

def test_delta2bbox_spec_vectors():
    rois = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5, 5, 5, 5]], dtype=torch.float32)
    deltas = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 2, -1], [0.7, -1.9, -0.5, 0.3]])
    out = delta2bbox(rois, deltas, RPN_STDS, max_shape=(32, 32))
    expected = torch.tensor([[0, 0, 1, 1], [0.140859, 0.140859, 2.859141, 2.859141],
                             [0, 0.316060, 4.194528, 0.683940], [5, 5, 5, 5]])
    assert torch.allclose(out, expected, atol=1e-5)
    clamped = delta2bbox(torch.tensor([[100.0, 50, 300, 150]]), torch.tensor([[1.0, -1, 30, -30]]), RCNN_STDS,
                         max_shape=(800, 1067))
    assert torch.allclose(clamped, torch.tensor([[0, 89.2, 1067, 90.8]]), atol=1e-3)


@pytest.mark.parametrize("stds", [RPN_STDS, RCNN_STDS])
def test_bbox2delta_delta2bbox_round_trip(stds):
    g = torch.Generator().manual_seed(0)
    # sizes within a ratio of 30 of each other, inside the dw/dh clamp of ln(62.5)
    xy = torch.rand(500, 2, generator=g) * 500
    rois = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=g) * 200], 1)
    xy = torch.rand(500, 2, generator=g) * 500
    gt = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=g) * 200], 1)
    deltas = bbox2delta(rois, gt, stds)
    assert torch.allclose(delta2bbox(rois, deltas, stds), gt, atol=1e-2)
    assert torch.allclose(bbox2delta(rois, delta2bbox(rois, deltas, stds), stds), deltas, atol=1e-4)


# --- RoI level mapping (spec §2.6)

def test_roi_levels_follow_finest_scale_56():
    scales = torch.tensor([10, 111.9, 112.0, 223.99, 224.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), scales, scales], 1)
    assert map_roi_levels(rois).tolist() == [0, 0, 1, 1, 2, 3, 3]


# --- NMS with mmcv semantics (spec §2.9, pitfalls 3 and 5)

def greedy_reference(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> list[int]:
    """mmcv's CPU nms written out: unstable descending sort, IoU with offset 0, suppress if IoU > thr."""
    order = scores.sort(0, descending=True)[1]
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    over = (inter / (area[:, None] + area[None, :] - inter) > thr).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep, pos = [], 0
    while True:  # visit only the survivors: each suppresses the later candidates it overlaps
        keep.append(int(order[pos]))
        suppressed[pos + 1:] |= over[pos, pos + 1:]
        later = np.flatnonzero(~suppressed[pos + 1:])
        if later.size == 0:
            return keep
        pos += 1 + int(later[0])


def tie_heavy_boxes(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 60], 1)
    scores = torch.randint(0, 20, (n,), generator=g).float() / 20  # many exact ties
    return boxes, scores


def test_nms_mmcv_matches_the_greedy_reference_on_tied_scores():
    boxes, scores = tie_heavy_boxes(600, 1)
    assert nms_mmcv(boxes, scores, 0.5).tolist() == greedy_reference(boxes, scores, 0.5)


def test_batched_nms_keeps_classes_apart_and_sorts_by_score():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, kept_scores = batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]  # box 2 overlaps box 0 (same class); box 1 is another class
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8])


def test_batched_nms_split_branch_equals_the_single_call_branch():
    boxes, scores = tie_heavy_boxes(12_000, 2)  # >= 10000 candidates: mmcv runs NMS class by class
    idxs = torch.randint(0, 5, (12_000,), generator=torch.Generator().manual_seed(3))
    keep, kept_scores = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(kept_scores, scores[keep]) and bool((kept_scores[:-1] >= kept_scores[1:]).all())
    for c in range(5):
        members = torch.nonzero(idxs == c).view(-1)
        expect = set(members[torch.tensor(greedy_reference(boxes[members], scores[members], 0.5))].tolist())
        assert set(keep[idxs[keep] == c].tolist()) == expect


# --- transform (spec §3) and its inverse

@pytest.mark.parametrize("wh,new_wh,scale_factor,padded_hw", [
    ((640, 480), (1067, 800), (1.6671875, 1.6666667), (800, 1088)),
    ((427, 640), (800, 1199), (1.8735363, 1.8734375), (1216, 800)),
    ((1920, 1080), (1333, 750), (0.6942708, 0.6944444), (768, 1344)),
    ((1000, 200), (1333, 267), (1.333, 1.335), (288, 1344)),
])
def test_resize_follows_mmcv_imrescale(wh, new_wh, scale_factor, padded_hw):
    w, h = wh
    image = np.zeros((h, w, 3), dtype=np.uint8)
    resized, meta = resize_image(image)
    assert resized.shape[:2] == (new_wh[1], new_wh[0]) and meta.img_shape == (new_wh[1], new_wh[0])
    assert meta.ori_shape == (h, w)
    assert meta.scale_factor == pytest.approx(scale_factor, abs=1e-6)
    assert padded_shape([meta.img_shape]) == padded_hw


def test_preprocess_flips_to_rgb_normalises_then_pads_with_zero():
    image = np.zeros((50, 70, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30  # B, G, R
    batch, metas = preprocess([image, image[:35]], scale=(70, 50))  # both fit 70x50 at scale factor 1
    assert batch.shape == (2, 3, 64, 96)
    expected = (torch.tensor([30.0, 20, 10]) - torch.tensor(MEAN_RGB)) / torch.tensor(STD_RGB)
    assert torch.allclose(batch[0, :, 0, 0], expected)
    assert metas[1].img_shape == (35, 70) and metas[1].scale_factor == (1.0, 1.0)
    assert torch.allclose(batch[1, :, 34, 69], expected)
    assert torch.all(batch[1, :, 35:, :] == 0) and torch.all(batch[1, :, :, 70:] == 0)
    assert torch.all(batch[0, :, 50:, :] == 0) and torch.all(batch[0, :, :, 70:] == 0)


def test_pad_batch_rounds_each_side_up_to_32():
    t = [torch.ones(3, 33, 64), torch.ones(3, 10, 65)]
    assert pad_batch(t).shape == (2, 3, 64, 96)


@pytest.mark.parametrize("rescale", list(Rescale))
def test_boxes_round_trip_through_resize_and_back(rescale):
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _, meta = resize_image(image)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * torch.tensor([600.0, 440.0])
    boxes = torch.cat([xy, xy + torch.rand(200, 2, generator=g) * 40], 1)
    back = boxes_to_original(boxes_to_resized(boxes, meta), meta, rescale)
    assert (back - boxes).abs().max() <= 1e-3
    # the whole resized image maps onto the whole original image
    full = torch.tensor([[0.0, 0.0, meta.img_shape[1], meta.img_shape[0]]])
    assert torch.allclose(boxes_to_original(full, meta, rescale), torch.tensor([[0.0, 0.0, 640.0, 480.0]]))


def test_meta_is_plain_data():
    meta = TwoStageMeta((1, 2), (3, 4), (1.5, 2.0))
    assert meta.ori_shape == (1, 2) and meta.scale_factor == (1.5, 2.0)


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32),
                                 np.zeros((0, 10, 3), np.uint8), "not an image",
                                 np.zeros((1, 5000, 3), np.uint8)])  # short side would resize to 0 px
def test_bad_images_are_refused_as_invalid_input(bad):
    with pytest.raises(InvalidImage):
        preprocess([bad])


def test_invalid_errors_map_to_a_4xx_status():
    from service.errors import http_status

    assert 400 <= http_status(InvalidImage("x")) < 500
