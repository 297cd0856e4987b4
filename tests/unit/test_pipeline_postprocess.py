"""Postprocessing on synthetic head outputs with known answers (spec §3)."""
from __future__ import annotations

import math

import pytest
import torch

from service.backends.base import InputDetections
from service.detectors.rtmdet.outputs import HeadOutputs
from service.pipeline.postprocess import (
    distance2bbox,
    filter_for_request,
    postprocess_head_outputs,
    postprocess_input_detections,
)
from service.pipeline.transforms import ImageMeta
from service import settings

S = 64  # input size: levels of 8x8, 4x4, 2x2
C = 3
LOW = -12.0  # sigmoid ~ 6e-6: below every threshold used here


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def blank_outputs(batch: int = 1, masks: bool = False) -> HeadOutputs:
    cls = [torch.full((batch, C, S // s, S // s), LOW) for s in (8, 16, 32)]
    reg = [torch.full((batch, 4, S // s, S // s), 1.0) for s in (8, 16, 32)]
    if not masks:
        return HeadOutputs(cls, reg)
    kernels = [torch.zeros(batch, 169, S // s, S // s) for s in (8, 16, 32)]
    return HeadOutputs(cls, reg, kernels, torch.zeros(batch, 8, S // 8, S // 8))


def put(out: HeadOutputs, *, level: int, row: int, col: int, label: int, score: float, ltrb, image: int = 0):
    out.cls_scores[level][image, label, row, col] = logit(score)
    out.bbox_preds[level][image, :, row, col] = torch.tensor(ltrb, dtype=torch.float32)


# Original image twice the input size: rescale multiplies by 2.
META = ImageMeta(ori_h=2 * S, ori_w=2 * S, new_h=S, new_w=S, input_size=S)
CFG = settings.TestConfig(nms_pre=1000, score_thr=0.05, iou_threshold=0.6, max_per_img=100, min_bbox_size=0)


def test_distance2bbox_and_clamp():
    points = torch.tensor([[24.0, 16.0], [60.0, 60.0]])
    dist = torch.tensor([[4.0, 5.0, 6.0, 7.0], [70.0, 1.0, 10.0, 10.0]])
    boxes = distance2bbox(points, dist, S)
    assert boxes.tolist() == [[20.0, 11.0, 30.0, 23.0], [0.0, 59.0, 64.0, 64.0]]


def test_decode_from_corner_prior_and_rescale():
    out = blank_outputs()
    # level 0 (stride 8), row 2, col 3: the prior sits on the cell corner (x=24, y=16)
    put(out, level=0, row=2, col=3, label=1, score=0.9, ltrb=(4, 5, 6, 7))
    # level 2 (stride 32), row 1, col 0: prior (0, 32); the box runs past the input and is clamped to S
    put(out, level=2, row=1, col=0, label=2, score=0.6, ltrb=(3, 2, 10, 40))
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert dets.labels.tolist() == [1, 2]
    assert dets.scores.tolist() == pytest.approx([0.9, 0.6], abs=1e-6)
    # input boxes (20,11,30,23) and (0,30,10,64) times 2
    assert dets.boxes_xyxy.tolist() == [[40.0, 22.0, 60.0, 46.0], [0.0, 60.0, 20.0, 128.0]]
    assert dets.priors.tolist() == [[24.0, 16.0, 8.0], [0.0, 32.0, 32.0]]


def test_multi_label_one_prior_gives_several_classes():
    out = blank_outputs()
    put(out, level=1, row=1, col=1, label=0, score=0.8, ltrb=(5, 5, 5, 5))
    out.cls_scores[1][0, 2, 1, 1] = logit(0.7)
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert dets.labels.tolist() == [0, 2]
    assert dets.boxes_xyxy[0].tolist() == dets.boxes_xyxy[1].tolist()  # class-aware NMS keeps both


def test_score_threshold_is_strict():
    out = blank_outputs()
    put(out, level=0, row=0, col=0, label=0, score=0.5, ltrb=(0, 0, 8, 8))  # sigmoid(0) == 0.5 exactly
    cfg = CFG.model_copy(update={"score_thr": 0.5})
    (dets,) = postprocess_head_outputs(out, [META], cfg)
    assert len(dets) == 0


def test_class_aware_nms():
    out = blank_outputs()
    put(out, level=0, row=4, col=4, label=0, score=0.9, ltrb=(8, 8, 8, 8))  # (24,24,40,40)
    put(out, level=0, row=4, col=5, label=0, score=0.8, ltrb=(16, 8, 0, 8))  # (24,24,40,40): IoU 1, suppressed
    put(out, level=0, row=5, col=4, label=1, score=0.7, ltrb=(8, 16, 8, 0))  # same box, other class: kept
    put(out, level=0, row=1, col=1, label=0, score=0.6, ltrb=(4, 4, 4, 4))  # far away: kept
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert dets.scores.tolist() == pytest.approx([0.9, 0.7, 0.6], abs=1e-6)
    assert dets.labels.tolist() == [0, 1, 0]
    # a partly overlapping box below the IoU threshold survives
    out2 = blank_outputs()
    put(out2, level=0, row=4, col=4, label=0, score=0.9, ltrb=(8, 8, 8, 8))  # (24,24,40,40)
    put(out2, level=0, row=4, col=5, label=0, score=0.8, ltrb=(8, 8, 8, 8))  # (32,24,48,40): IoU 1/3
    (dets2,) = postprocess_head_outputs(out2, [META], CFG)
    assert len(dets2) == 2


def test_max_per_img_keeps_the_best():
    out = blank_outputs()
    for k in range(8):  # eight disjoint boxes on the level-0 diagonal, scores 0.1 .. 0.8
        put(out, level=0, row=k, col=k, label=0, score=0.1 * (k + 1), ltrb=(2, 2, 2, 2))
    cfg = CFG.model_copy(update={"max_per_img": 3})
    (dets,) = postprocess_head_outputs(out, [META], cfg)
    assert dets.scores.tolist() == pytest.approx([0.8, 0.7, 0.6], abs=1e-6)
    assert dets.priors[:, 0].tolist() == [56.0, 48.0, 40.0]


def test_nms_pre_is_per_level():
    out = blank_outputs()
    put(out, level=0, row=0, col=0, label=0, score=0.9, ltrb=(0, 0, 4, 4))
    put(out, level=0, row=7, col=7, label=0, score=0.8, ltrb=(0, 0, 4, 4))
    put(out, level=1, row=3, col=3, label=0, score=0.3, ltrb=(0, 0, 4, 4))
    cfg = CFG.model_copy(update={"nms_pre": 1})
    (dets,) = postprocess_head_outputs(out, [META], cfg)
    assert dets.scores.tolist() == pytest.approx([0.9, 0.3], abs=1e-6)


def test_min_bbox_size_drops_degenerate_boxes():
    out = blank_outputs()
    put(out, level=0, row=2, col=2, label=0, score=0.9, ltrb=(0, 0, 0, 5))  # zero width
    put(out, level=0, row=5, col=5, label=0, score=0.8, ltrb=(1, 1, 1, 1))  # 2x2 input -> 4x4 original
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert dets.scores.tolist() == pytest.approx([0.8], abs=1e-6)
    cfg = CFG.model_copy(update={"min_bbox_size": 4.0})  # strict: 4 > 4 is false
    (dets,) = postprocess_head_outputs(out, [META], cfg)
    assert len(dets) == 0


def test_batch_images_are_independent_and_rescaled_by_their_own_meta():
    out = blank_outputs(batch=2)
    put(out, level=0, row=2, col=3, label=1, score=0.9, ltrb=(4, 5, 6, 7), image=0)
    put(out, level=1, row=1, col=1, label=0, score=0.7, ltrb=(2, 2, 2, 2), image=1)
    put(out, level=1, row=2, col=2, label=2, score=0.6, ltrb=(2, 2, 2, 2), image=1)
    # second image: 100 wide x 50 high -> new 64 x 32, w_scale 0.64, h_scale 0.64
    meta2 = ImageMeta(ori_h=50, ori_w=100, new_h=32, new_w=64, input_size=S)
    first, second = postprocess_head_outputs(out, [META, meta2], CFG)
    assert first.labels.tolist() == [1] and second.labels.tolist() == [0, 2]
    assert second.boxes_xyxy[0].tolist() == pytest.approx([14 / 0.64, 14 / 0.64, 18 / 0.64, 18 / 0.64])


def test_ins_outputs_carry_kernels_of_the_kept_priors():
    out = blank_outputs(masks=True)
    put(out, level=1, row=2, col=1, label=0, score=0.9, ltrb=(4, 4, 4, 4))
    out.kernel_preds[1][0, :, 2, 1] = torch.arange(169, dtype=torch.float32)
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert dets.kernels.shape == (1, 169)
    assert dets.kernels[0].tolist() == list(range(169))
    assert dets.priors.tolist() == [[16.0, 32.0, 16.0]]


def test_no_candidates_gives_empty_result():
    (dets,) = postprocess_head_outputs(blank_outputs(), [META], CFG)
    assert len(dets) == 0 and dets.boxes_xyxy.shape == (0, 4)


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError):
        postprocess_head_outputs(blank_outputs(batch=2), [META], CFG)


def test_end2end_detections_are_clamped_rescaled_filtered():
    dets = torch.tensor(
        [
            [[10.0, 10.0, 20.0, 30.0, 0.4], [-5.0, 2.0, 70.0, 10.0, 0.9], [0, 0, 0, 0, 0.0], [1, 1, 5, 5, 0.01]],
        ]
    )
    labels = torch.tensor([[2, 0, -1, 1]])
    (out,) = postprocess_input_detections(InputDetections(dets, labels), [META], CFG)
    assert out.scores.tolist() == pytest.approx([0.9, 0.4])
    assert out.labels.tolist() == [0, 2]
    assert out.boxes_xyxy.tolist() == [[0.0, 4.0, 128.0, 20.0], [20.0, 20.0, 40.0, 60.0]]
    one = postprocess_input_detections(InputDetections(dets, labels), [META], CFG.model_copy(update={"max_per_img": 1}))
    assert len(one[0]) == 1


def test_request_filters():
    out = blank_outputs()
    for k, (label, score) in enumerate([(0, 0.9), (1, 0.8), (2, 0.5), (0, 0.3), (1, 0.2)]):
        put(out, level=0, row=k, col=k, label=label, score=score, ltrb=(2, 2, 2, 2))
    (dets,) = postprocess_head_outputs(out, [META], CFG)
    assert len(filter_for_request(dets, score_thr=0.3, max_dets=None, class_ids=None)) == 4  # >= threshold
    kept = filter_for_request(dets, score_thr=0.0, max_dets=None, class_ids=[1])
    assert kept.scores.tolist() == pytest.approx([0.8, 0.2])
    kept = filter_for_request(dets, score_thr=0.25, max_dets=2, class_ids=[0, 2])
    assert kept.scores.tolist() == pytest.approx([0.9, 0.5])
    assert len(filter_for_request(dets, score_thr=0.0, max_dets=0, class_ids=None)) == 0


def _reference_single_image(out: HeadOutputs, image: int, meta: ImageMeta, cfg) -> tuple:
    """MMDetection's per-image path, written the upstream way: nonzero + sort per level, loops."""
    from torchvision.ops import batched_nms

    all_boxes, all_scores, all_labels = [], [], []
    for cls, reg, stride in zip(out.cls_scores, out.bbox_preds, (8, 16, 32)):
        _, h, w = cls[image].shape
        scores = cls[image].permute(1, 2, 0).reshape(-1, C).sigmoid()
        ltrb = reg[image].permute(1, 2, 0).reshape(-1, 4)
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        priors = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float()
        valid = torch.nonzero(scores > cfg.score_thr)
        kept_scores = scores[scores > cfg.score_thr]
        kept_scores, order = kept_scores.sort(descending=True)
        top = valid[order[: cfg.nms_pre]]
        prior_idx, labels = top[:, 0], top[:, 1]
        p, d = priors[prior_idx], ltrb[prior_idx]
        boxes = torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, S)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, S)
        all_boxes.append(boxes)
        all_scores.append(kept_scores[: cfg.nms_pre])
        all_labels.append(labels)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    w_scale, h_scale = meta.scale_factor
    boxes = boxes / boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh[:, 0] > cfg.min_bbox_size) & (wh[:, 1] > cfg.min_bbox_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, cfg.iou_threshold)[: cfg.max_per_img]
    return boxes[keep], scores[keep], labels[keep]


@pytest.mark.parametrize("nms_pre", [1000, 7])
def test_batched_path_matches_the_upstream_style_reference(nms_pre):
    g = torch.Generator().manual_seed(0)
    batch = 2
    cls = [torch.randn(batch, C, S // s, S // s, generator=g) * 2 for s in (8, 16, 32)]
    reg = [torch.rand(batch, 4, S // s, S // s, generator=g) * 3 * s for s in (8, 16, 32)]
    out = HeadOutputs(cls, reg)
    metas = [META, ImageMeta(ori_h=50, ori_w=100, new_h=32, new_w=64, input_size=S)]
    cfg = CFG.model_copy(update={"score_thr": 0.3, "nms_pre": nms_pre, "max_per_img": 40})
    ours = postprocess_head_outputs(out, metas, cfg)
    for i, meta in enumerate(metas):
        boxes, scores, labels = _reference_single_image(out, i, meta, cfg)
        assert len(ours[i]) == len(scores) > 0
        torch.testing.assert_close(ours[i].scores, scores)
        torch.testing.assert_close(ours[i].boxes_xyxy, boxes)
        assert torch.equal(ours[i].labels, labels)


def test_end2end_detections_get_a_second_nms_only_when_a_request_asks_for_another_one():
    from service.detectors.base import ImageNms

    # two overlapping boxes of different classes (IoU 0.5) that the graph's class-wise NMS kept
    dets = torch.tensor([[[10.0, 10.0, 30.0, 30.0, 0.9], [10.0, 16.67, 30.0, 36.67, 0.8]]])
    labels = torch.tensor([[0, 1]])
    graph = InputDetections(dets, labels)
    assert len(postprocess_input_detections(graph, [META], CFG, [ImageNms.of(CFG)])[0]) == 2
    (agnostic,) = postprocess_input_detections(graph, [META], CFG, [ImageNms(0.6, class_agnostic=True)])
    assert len(agnostic) == 2  # IoU 0.5 <= 0.6: nothing to suppress
    (strict,) = postprocess_input_detections(graph, [META], CFG, [ImageNms(0.4, class_agnostic=True)])
    assert strict.scores.tolist() == pytest.approx([0.9])


def test_head_outputs_take_one_nms_setting_per_image():
    from service.detectors.base import ImageNms

    out = blank_outputs(batch=2)
    for image in range(2):  # the same two overlapping boxes of different classes in both images
        put(out, level=0, row=4, col=4, label=0, score=0.9, ltrb=(8, 8, 8, 8), image=image)
        put(out, level=0, row=4, col=5, label=1, score=0.8, ltrb=(8, 8, 8, 8), image=image)
    first, second = postprocess_head_outputs(out, [META, META], CFG, nms=[ImageNms(0.3, True), ImageNms.of(CFG)])  # IoU 1/3
    assert first.labels.tolist() == [0] and second.labels.tolist() == [0, 1]
