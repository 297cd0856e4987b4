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


def write_two_stage_model(store, name: str, arch: str = "mask-rcnn-r50-fpn", classes=("a", "b", "c"), *,
                          backend: str = "eager", max_per_img: int = 5, extra: str = ""):
    """A model folder serving a calibrated random-weight two-stage detector at SMALL_SCALE, cheap test_cfg."""
    from pathlib import Path

    from service.detectors.checkpoint import save_checkpoint

    folder = Path(store) / name
    folder.mkdir(parents=True, exist_ok=True)
    model = detecting_model(arch, [shapes_image(seed) for seed in range(4)], num_classes=len(classes))
    save_checkpoint(folder / "weights.pth", model.state_dict(), list(classes))
    (folder / "model.toml").write_text(
        f'name = "{name}"\narch = "{arch}"\nweights = "weights.pth"\nbackend = "{backend}"\n'
        f"resize_scale = [{SMALL_SCALE[0]}, {SMALL_SCALE[1]}]\ndefault_score_thr = 0.05\n{extra}"
        f"[test_cfg]\niou_threshold = 0.5\nmax_per_img = {max_per_img}\n[test_cfg.rpn]\nmax_per_img = 150\n"
        "[workers]\ncount = 1\nthreads = 1\n[batch]\nmax_batch_size = 4\n")
    return folder
