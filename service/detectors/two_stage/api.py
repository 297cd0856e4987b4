"""The two-stage family's entry points: registry, build, checkpoint layout, predict.

The serving path reaches these through the detector contract (`family.py`, registered in
service/detectors/base.py); `predict` is the standalone whole-pipeline call used by tests and tools.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from service.errors import ConfigError, InvalidImage

from ..base import ImageNms
from ..checkpoint import Checkpoint, load_checkpoint, load_weights
from .config import TwoStageTestConfig
from .decode import ImageDetections, decode_bboxes, mask_probabilities, paste_masks_rle, rois_from
from .model import RPNOutputs, TwoStageDetector
from .resnet import RESNET_SPECS
from .rpn import proposals_for_batch
from .transforms import (
    SCALE, Rescale, TwoStageMeta, boxes_to_original, pad_batch, padded_shape, resize_and_normalize,
)

CLASSIFIER_KEY = "roi_head.bbox_head.fc_cls.weight"


@dataclass(frozen=True)
class TwoStageSpec:
    name: str
    backbone: str  # key of RESNET_SPECS
    with_mask: bool


REGISTRY: dict[str, TwoStageSpec] = {
    f"{family}-{backbone}-fpn": TwoStageSpec(f"{family}-{backbone}-fpn", backbone, family == "mask-rcnn")
    for family in ("faster-rcnn", "mask-rcnn") for backbone in RESNET_SPECS
}


def list_archs() -> list[str]:
    return list(REGISTRY)


def arch_spec(arch: str) -> TwoStageSpec:
    try:
        return REGISTRY[arch]
    except KeyError:
        raise ConfigError(f"unknown two-stage arch {arch!r}; known: {', '.join(REGISTRY)}") from None


def build(arch: str, num_classes: int = 80) -> TwoStageDetector:
    """A randomly initialised detector in eval mode, with mmdet's module names."""
    spec = arch_spec(arch)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return TwoStageDetector(RESNET_SPECS[spec.backbone], num_classes, spec.with_mask).eval()


def num_classes_in(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Foreground classes of a two-stage checkpoint: rows of fc_cls minus the background row."""
    weight = state_dict.get(CLASSIFIER_KEY)
    return int(weight.shape[0]) - 1 if weight is not None else None


def load_detector(arch: str, path: str | Path) -> tuple[TwoStageDetector, Checkpoint]:
    """Build `arch` with the checkpoint's own class count and load it strictly (through the safe loader)."""
    checkpoint = load_checkpoint(path)
    num_classes = num_classes_in(checkpoint.state_dict)
    if num_classes is None:
        raise ConfigError(f"{path} has no {CLASSIFIER_KEY}: not a Faster/Mask R-CNN checkpoint")
    with torch.device("meta"):  # no random init of weights the checkpoint overwrites anyway
        model = build(arch, num_classes)
    model = model.to_empty(device="cpu")
    # strict: every parameter and buffer of the uninitialised model is filled from the file, or this raises
    load_weights(model, checkpoint, strict=True)
    return model.eval(), checkpoint


class TwoStageNetwork(Protocol):
    """What `predict` runs: the eager `TwoStageDetector` or `onnx_export.OnnxTwoStage`; raw tensors out."""

    with_mask: bool

    def rpn_forward(self, inputs: torch.Tensor) -> RPNOutputs: ...

    def bbox_forward(self, feats: tuple[torch.Tensor, ...],
                     rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mask_forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor) -> torch.Tensor: ...


@torch.inference_mode()
def predict(model: TwoStageNetwork, images: list[np.ndarray], test_cfg: TwoStageTestConfig | None = None,
            scale: tuple[int, int] = SCALE, group_by_padded_shape: bool = True) -> list[ImageDetections]:
    """uint8 BGR images -> detections per image, in original-image pixels, in input order.

    Images whose padded input shapes agree run as one batch through every stage. With
    `group_by_padded_shape` (default), images of different padded shapes run as separate batches, so each
    image gets exactly the padding (and so the border features) it gets alone, as in mmdet's batch-1 test;
    without it the whole list is padded to one shape (spec pitfall 19). `scale` is the resize target
    (long, short edge): mmdet's configs use 1333x800, tests smaller ones.
    """
    cfg = test_cfg or TwoStageTestConfig()
    if not images:
        raise InvalidImage("no images given")
    tensors, metas = resize_and_normalize(images, scale)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, meta in enumerate(metas):
        groups.setdefault(padded_shape([meta.img_shape]) if group_by_padded_shape else (0, 0), []).append(i)
    results: list[ImageDetections | None] = [None] * len(images)
    for members in groups.values():
        inputs = pad_batch([tensors[i] for i in members])
        for i, detections in zip(members, _predict_padded(model, inputs, [metas[i] for i in members], cfg)):
            results[i] = detections
    return results


@dataclass(frozen=True)
class StageDetections:
    """One image after every network stage, before mask pasting: boxes in original-image pixels."""

    boxes_xyxy: torch.Tensor  # [N, 4] float32
    scores: torch.Tensor  # [N]
    labels: torch.Tensor  # [N] int64
    mask_probs: torch.Tensor | None  # [N, 28, 28] probabilities of each box's own class (Mask R-CNN)


def _predict_padded(model: TwoStageNetwork, inputs: torch.Tensor, metas: list[TwoStageMeta],
                    cfg: TwoStageTestConfig) -> list[ImageDetections]:
    """One padded batch through the stages, then the masks pasted as RLE at each original size."""
    results = []
    for dets, meta in zip(detect_padded(model, inputs, metas, cfg), metas):
        masks = None
        if dets.mask_probs is not None:
            masks = paste_masks_rle(dets.mask_probs, dets.boxes_xyxy, meta.ori_shape, cfg.mask_thr_binary,
                                    cfg.mask_band_bytes)
        results.append(ImageDetections(dets.boxes_xyxy, dets.scores, dets.labels, masks))
    return results


def detect_padded(model: TwoStageNetwork, inputs: torch.Tensor, metas: list[TwoStageMeta],
                  cfg: TwoStageTestConfig, nms: Sequence[ImageNms] | None = None) -> list[StageDetections]:
    """One padded batch [B, 3, Hb, Wb] through the stages, the RoI heads over all B images at once.
    `nms`: each image's final (R-CNN) NMS setting, default cfg's; the RPN's NMS is the model's.

    Host-side between the network pieces: proposal selection after the RPN, class-wise NMS after the
    bbox head (spec §5.1), so an eager module and ONNX sessions share every line of it.
    """
    if isinstance(model, torch.nn.Module):
        inputs = inputs.to(next(model.parameters()).device)
    rpn = model.rpn_forward(inputs)
    proposals = proposals_for_batch(rpn.cls_per_level, rpn.reg_per_level, [m.img_shape for m in metas],
                                    nms_pre=cfg.rpn.nms_pre, iou_threshold=cfg.rpn.iou_threshold,
                                    max_per_img=cfg.rpn.max_per_img)
    rois = rois_from(proposals)
    cls_logits, bbox_deltas = model.bbox_forward(rpn.feats, rois)
    per_image = decode_bboxes(cls_logits, bbox_deltas, rois, metas, cfg, rescale_before_nms=not model.with_mask,
                              nms=nms)
    if not model.with_mask:
        return [StageDetections(boxes.cpu(), scores.cpu(), labels.cpu(), None) for boxes, scores, labels in per_image]
    det_rois = rois_from([boxes for boxes, _, _ in per_image])
    probs = mask_probabilities(model.mask_forward(rpn.feats, det_rois),
                               torch.cat([labels for _, _, labels in per_image]))
    results = []
    for (boxes, scores, labels), img_probs, meta in zip(per_image, probs.split([len(b) for b, _, _ in per_image]),
                                                        metas):
        boxes = boxes_to_original(boxes, meta, Rescale.DIVIDE)
        results.append(StageDetections(boxes.cpu(), scores.cpu(), labels.cpu(), img_probs.cpu()))
    return results
