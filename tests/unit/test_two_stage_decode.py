"""Two-stage selection steps on hand-made raw outputs: RPN proposals (per-level NMS, strict size filter,
nms_pre) and the R-CNN decode (background dropped, strict score threshold, class-wise NMS, rescale order)."""
from __future__ import annotations

import math

import torch

from service.detectors.two_stage import TwoStageTestConfig
from service.detectors.two_stage.decode import decode_bboxes, rois_from
from service.detectors.two_stage.rpn import grid_anchors, select_proposals
from service.detectors.two_stage.transforms import TwoStageMeta

LOGIT = {p: math.log(p / (1 - p)) for p in (0.9, 0.8, 0.7, 0.1)}


def rpn_maps(levels_hw, cells):
    """Objectness maps [A, h, w] at a very low score, with chosen (level, anchor, i, j) cells set."""
    cls = [torch.full((3, h, w), -20.0) for h, w in levels_hw]
    reg = [torch.zeros((12, h, w)) for h, w in levels_hw]
    for (level, a, i, j), p in cells.items():
        cls[level][a, i, j] = LOGIT[p]
    return cls, reg


def test_rpn_nms_runs_per_level_and_drops_clipped_empty_boxes():
    sizes = [(8, 8), (4, 4)]
    anchors = [grid_anchors(sizes[0], 4), grid_anchors(sizes[1], 8)]
    # square anchors centred at (16, 16) on two levels (32x32 on level 0, 64x64 on level 1) both clip to
    # [0, 0, 32, 32]: identical boxes, both kept, because NMS never compares levels. A level-0 neighbour
    # centred at (20, 16) clips to [4, 0, 32, 32] (IoU 0.875 with the first) and is suppressed.
    cells = {(0, 1, 4, 4): 0.9, (1, 1, 2, 2): 0.8, (0, 1, 4, 5): 0.7}
    cls, reg = rpn_maps(sizes, cells)
    props = select_proposals(cls, reg, anchors, (32, 32), nms_pre=1000, iou_threshold=0.2, max_per_img=1000)
    top = props[:2]
    assert torch.allclose(top[0], torch.tensor([0.0, 0, 32, 32]))  # clipped to img_shape (32, 32)
    assert torch.allclose(top[1], torch.tensor([0.0, 0, 32, 32]))  # level 1's box, clipped; not suppressed
    # the level-0 neighbour (IoU with the first > 0.2, same level) is gone
    assert not any(torch.allclose(p, torch.tensor([4.0, 0, 32, 32])) for p in props)
    # every proposal has positive width and height (boxes clipped to zero size are dropped)
    assert bool(((props[:, 2] - props[:, 0]) > 0).all() and ((props[:, 3] - props[:, 1]) > 0).all())


def test_rpn_keeps_nms_pre_per_level_and_caps_the_image():
    sizes = [(8, 8)]
    anchors = [grid_anchors(sizes[0], 4)]
    cls, reg = rpn_maps(sizes, {})
    cls[0] = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    props = select_proposals(cls, reg, anchors, (32, 32), nms_pre=10, iou_threshold=1.0, max_per_img=7)
    assert props.shape == (7, 4)


def test_rcnn_decode_drops_background_thresholds_strictly_and_rescales_faster_before_nms():
    num_classes = 3
    proposals = [torch.tensor([[10.0, 10, 50, 50], [12.0, 10, 52, 50]]), torch.tensor([[0.0, 0, 20, 20]])]
    rois = rois_from(proposals)
    probs = torch.tensor([
        [0.60, 0.05, 0.05, 0.30],  # class 0 wins; class 1/2 exactly at the threshold (not > 0.05)
        [0.55, 0.10, 0.05, 0.30],  # overlaps roi 0 with IoU > 0.5: class 0 suppressed, class 1 kept
        [0.00, 0.00, 0.20, 0.80],  # background (last index) is never a detection
    ])
    cls_logits = probs.clamp(min=1e-12).log()
    deltas = torch.zeros(3, 4 * num_classes)
    metas = [TwoStageMeta((30, 30), (60, 60), (2.0, 2.0)), TwoStageMeta((20, 20), (20, 20), (1.0, 1.0))]
    cfg = TwoStageTestConfig(score_thr=0.05, iou_threshold=0.5)
    (b0, s0, l0), (b1, s1, l1) = decode_bboxes(cls_logits, deltas, rois, metas, cfg, rescale_before_nms=True)
    assert l0.tolist() == [0, 1] and torch.allclose(s0, torch.tensor([0.60, 0.10]))
    assert torch.allclose(b0[0], torch.tensor([5.0, 5, 25, 25]))  # halved: original pixels
    assert l1.tolist() == [2] and torch.allclose(b1, torch.tensor([[0.0, 0, 20, 20]]))
    (m0, _, _), _ = decode_bboxes(cls_logits, deltas, rois, metas, cfg, rescale_before_nms=False)
    assert torch.allclose(m0[0], torch.tensor([10.0, 10, 50, 50]))  # Mask R-CNN: still resized pixels


def test_rcnn_decode_handles_images_without_proposals():
    rois = rois_from([torch.zeros((0, 4)), torch.tensor([[0.0, 0, 10, 10]])])
    cls_logits = torch.tensor([[5.0, -5.0]])
    deltas = torch.zeros(1, 4)
    metas = [TwoStageMeta((10, 10), (10, 10), (1.0, 1.0))] * 2
    (b0, s0, l0), (b1, s1, l1) = decode_bboxes(cls_logits, deltas, rois, metas, TwoStageTestConfig(),
                                               rescale_before_nms=True)
    assert b0.shape == (0, 4) and s0.shape == (0,) and l0.dtype == torch.int64
    assert l1.tolist() == [0]
