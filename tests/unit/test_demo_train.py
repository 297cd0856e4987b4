"""Training-side math must mean what inference reads: priors, mask dynamic conv, derived weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from service.demo.assigner import assign, box_iou, distance_to_box, make_priors
from service.demo.derive import detection_state_from_ins
from service.demo.losses import dynamic_mask_logits, giou_loss, quality_focal_loss
from service.demo.train import TrainConfig, split_outputs, train
from service.detectors.checkpoint import load_checkpoint
from service.detectors.registry import build_detector
from service.detectors.rtmdet.priors import grid_priors
from service.pipeline.masks import mask_logits_stride8


def test_priors_match_the_detector_grid():
    ours = make_priors(320)
    theirs = torch.cat(grid_priors([(40, 40), (20, 20), (10, 10)], with_stride=True))
    assert torch.equal(ours[:, :2], theirs[:, :2])
    assert torch.equal(ours[:, 2], theirs[:, 2])


def test_training_mask_math_equals_inference_mask_math():
    gen = torch.Generator().manual_seed(0)
    mask_feat = torch.randn(8, 40, 40, generator=gen)
    kernels = torch.randn(5, 169, generator=gen)
    priors = torch.tensor([[0, 0, 8], [64, 32, 8], [160, 96, 16], [288, 288, 32], [312, 8, 8]]).float()
    ours = dynamic_mask_logits(mask_feat, kernels, priors)
    theirs = mask_logits_stride8(mask_feat, kernels, priors)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_split_outputs_flattens_in_prior_order():
    model = build_detector("rtmdet-ins-tiny", 5)
    with torch.no_grad():
        outs = model(torch.zeros(1, 3, 320, 320))
    parts = split_outputs(outs, has_masks=True)
    assert parts["cls"].shape == (1, 2100, 5) and parts["ltrb"].shape == (1, 2100, 4)
    assert parts["kernels"].shape == (1, 2100, 169) and parts["mask_feat"].shape == (1, 8, 40, 40)
    # Row 1600 is the first P4 position (x=0, y=0 at stride 16).
    assert torch.equal(parts["cls"][0, 1600], outs[1][0, :, 0, 0])
    assert torch.equal(parts["ltrb"][0, 41], outs[3][0, :, 1, 1])


def test_assigner_picks_priors_inside_each_box_with_its_label():
    priors = make_priors(320)
    gt = torch.tensor([[40.0, 40.0, 120.0, 120.0], [200.0, 180.0, 300.0, 260.0]])
    labels = torch.tensor([3, 1])
    # Predictions equal to the right gt wherever a prior lies inside it: a perfect detector.
    pred = torch.zeros(len(priors), 4)
    for g in range(2):
        inside = (priors[:, 0] > gt[g, 0]) & (priors[:, 0] < gt[g, 2]) & (priors[:, 1] > gt[g, 1]) & (priors[:, 1] < gt[g, 3])
        pred[inside] = gt[g]
    logits = torch.full((len(priors), 5), -5.0)
    a = assign(priors, logits, pred, gt, labels)
    assert set(a.gt_index.tolist()) == {0, 1}
    for p, g in zip(a.pos_index.tolist(), a.gt_index.tolist()):
        x, y = priors[p, :2].tolist()
        assert gt[g, 0] < x < gt[g, 2] and gt[g, 1] < y < gt[g, 3]
    assert torch.allclose(a.iou, torch.ones_like(a.iou))


def test_losses_reward_the_right_answer():
    target = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    assert giou_loss(target.clone(), target).item() < 1e-5
    assert giou_loss(torch.tensor([[60.0, 60.0, 70.0, 70.0]]), target).item() > 1.0
    logits = torch.full((4, 5), -6.0)
    good = logits.clone()
    good[2, 1] = 6.0
    idx, lab, score = torch.tensor([2]), torch.tensor([1]), torch.tensor([1.0])
    assert quality_focal_loss(good, idx, lab, score) < quality_focal_loss(logits, idx, lab, score)
    box = distance_to_box(torch.tensor([[100.0, 50.0, 8.0]]), torch.tensor([[10.0, 5.0, 20.0, 15.0]]))
    assert box.tolist() == [[90.0, 45.0, 120.0, 65.0]]
    assert box_iou(box, box).item() == 1.0


def test_derived_detection_model_gives_the_ins_model_boxes_and_scores():
    torch.manual_seed(0)
    ins = build_detector("rtmdet-ins-tiny", 5)
    with torch.no_grad():
        for conv in ins.bbox_head.rtm_reg:
            conv.bias.fill_(3.0)  # positive distances: relu is the identity, as for trained priors in boxes
    det = build_detector("rtmdet-tiny", 5)
    det.load_state_dict(detection_state_from_ins(ins.state_dict()), strict=True)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        a, b = ins(x), det(x)
    for i in range(6):  # cls x3, bbox x3
        torch.testing.assert_close(a[i], b[i])


@pytest.mark.slow  # builds, trains and saves a model: ~10 s idle, much longer on a busy machine
def test_a_short_training_run_writes_a_loadable_fp16_checkpoint(tmp_path):
    cfg = TrainConfig(arch="rtmdet-ins-tiny", out=tmp_path, iters=2, batch_size=2, num_images=3,
                      warmup_iters=1, threads=1, log_every=1)
    lines: list[str] = []
    path = train(cfg, log=lines.append)
    assert any("iter 1/2" in line for line in lines)
    assert all("nan" not in line for line in lines)
    ckpt = load_checkpoint(path)
    assert tuple(ckpt.classes) == ("circle", "square", "triangle", "star", "hexagon")
    assert ckpt.state_dict["bbox_head.rtm_cls.0.weight"].dtype == torch.float16
    model = build_detector("rtmdet-ins-tiny", 5)
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=True)
    assert np.isfinite(ckpt.state_dict["bbox_head.rtm_cls.0.bias"].float().numpy()).all()
