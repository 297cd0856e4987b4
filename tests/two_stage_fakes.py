"""Random-weight two-stage detectors that actually detect, for tests (the spec's §7 recipe).

PyTorch's default init gives near-uniform class softmax (~1/81 < score_thr) and so no detections. As the
spec's own check did: BN running statistics are calibrated on the test images, fc_cls is scaled x20 and
conv_logits x4 (its bias set to 0.5), so ~100 detections pass score > 0.05 and masks are non-trivial.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from service.detectors.two_stage import build
from service.detectors.two_stage.transforms import preprocess

SMALL_SCALE = (160, 128)  # resize target for tests: a 160x128 image keeps its size (sf 1) and needs no padding


def shapes_image(seed: int, width: int = 160, height: int = 128) -> np.ndarray:
    """A BGR uint8 image with a few filled shapes on a noisy background (real edges for the convs)."""
    from service.demo.dataset import render_sample

    image, _ = render_sample(np.random.default_rng(seed), width, height, min_shapes=3, max_shapes=6)
    return image


@torch.no_grad()
def detecting_model(arch: str, calibration_images: list[np.ndarray], seed: int = 0, num_classes: int = 80):
    torch.manual_seed(seed)
    model = build(arch, num_classes)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
    inputs, _ = preprocess(calibration_images, SMALL_SCALE)
    model.backbone.train()
    model.backbone(inputs)
    model.eval()
    model.roi_head.bbox_head.fc_cls.weight.mul_(20)
    if model.with_mask:
        model.roi_head.mask_head.conv_logits.weight.mul_(4)
        model.roi_head.mask_head.conv_logits.bias.fill_(0.5)  # centre the logits so masks are partly filled
    return model
