"""Random-weight two-stage detectors that actually detect: for tests and the two-stage benchmark.

PyTorch's default init gives a near-uniform class softmax (~1/81 < score_thr) and so no detections, which
would make a benchmark measure an empty RoI stage and no masks. As the spec's own check did (§7): BN
running statistics are calibrated on real-looking images, fc_cls is scaled x20 and conv_logits x4 (its
bias set to 0.5), so ~100 detections pass score > 0.05 and the masks are non-trivial.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .api import build
from .transforms import preprocess

CALIBRATION_SCALE = (160, 128)  # small on purpose: BN statistics only need the images' content


def shapes_image(seed: int, width: int = 160, height: int = 128) -> np.ndarray:
    """A BGR uint8 image with a few filled shapes on a noisy background (real edges for the convs)."""
    from service.demo.dataset import render_sample

    image, _ = render_sample(np.random.default_rng(seed), width, height, min_shapes=3, max_shapes=6)
    return image


@torch.no_grad()
def detecting_model(arch: str, calibration_images: Sequence[np.ndarray], seed: int = 0, num_classes: int = 80,
                    scale: tuple[int, int] = CALIBRATION_SCALE) -> nn.Module:
    """`arch` with seeded random weights, calibrated as the module docstring says; eval mode."""
    torch.manual_seed(seed)
    model = build(arch, num_classes)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
    inputs, _ = preprocess(list(calibration_images), scale)
    model.backbone.train()
    model.backbone(inputs)
    model.eval()
    model.roi_head.bbox_head.fc_cls.weight.mul_(20)
    if model.with_mask:
        model.roi_head.mask_head.conv_logits.weight.mul_(4)
        model.roi_head.mask_head.conv_logits.bias.fill_(0.5)  # centre the logits so masks are partly filled
    return model


def save_detecting_checkpoint(path: str | Path, arch: str, classes: Sequence[str], seed: int = 0) -> Path:
    """A calibrated random-weight checkpoint of `arch` with `len(classes)` classes, in detserve's format."""
    from ..checkpoint import save_checkpoint

    model = detecting_model(arch, [shapes_image(s) for s in range(4)], seed=seed, num_classes=len(classes))
    save_checkpoint(path, model.state_dict(), list(classes))
    return Path(path)
