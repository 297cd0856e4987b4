"""Faster R-CNN / Mask R-CNN behind the detector contract (service/detectors/base.py).

Transform: mmdet's keep-ratio resize to `resize_scale` (default 1333x800), RGB mean/std, zero pad to 32
(transforms.py); inverse `boxes_to_original`. The network runs in three pieces, features+RPN, bbox head,
mask head, with proposal selection and class-wise NMS host-side in between (api.detect_padded), so the
family drives the backend's runner itself: the eager backend's module or ONNX Runtime sessions of the
three graphs. Images are batched per padded shape (spec pitfall 19: a batch then equals single calls).
Masks: the 28x28 probabilities ride with the detections and are pasted as RLE only for those a request
keeps.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.errors import ConfigError

from ..base import Detector, nms_per_image, register
from .api import CLASSIFIER_KEY, REGISTRY, StageDetections, TwoStageSpec, build, detect_padded, num_classes_in
from .config import RPNTestConfig, TwoStageTestConfig
from .decode import paste_masks_rle
from .onnx_export import FEATURE_NAMES, NUM_LEVELS, OnnxTwoStage, export_two_stage
from .resnet import RESNET_SPECS
from .transforms import (
    SCALE, Rescale, TwoStageMeta, boxes_to_original, boxes_to_resized, pad_batch, padded_shape, resize_and_normalize,
)

# The RoI graphs live next to the features graph (`onnxruntime.model`) under these fixed names.
BBOX_GRAPH = "roi_bbox.onnx"
MASK_GRAPH = "roi_mask.onnx"
MASK_PREFIX = "roi_head.mask_head."
FEATURE_OUTPUTS = FEATURE_NAMES + [f"cls{i}" for i in range(NUM_LEVELS)] + [f"reg{i}" for i in range(NUM_LEVELS)]


@dataclass(frozen=True)
class TwoStageInputs:
    """Preprocessed, unpadded images: padding is per group of equal padded shape, inside `run`."""

    tensors: list[torch.Tensor]  # [3, h_i, w_i] normalised RGB


@dataclass(frozen=True)
class TwoStageOutputs:
    """Every network stage done, per image; boxes in original pixels, masks not pasted yet."""

    per_image: list[StageDetections]

    @property
    def batch_size(self) -> int:
        return len(self.per_image)


class RCNNDetector(Detector):
    family = "two-stage"
    classifier_key = CLASSIFIER_KEY

    def __init__(self, spec: TwoStageSpec):
        self.spec = spec
        self.arch = spec.name
        self.has_masks = spec.with_mask

    # --- network and checkpoint layout -----------------------------------------------------

    def build(self, num_classes: int) -> nn.Module:
        return build(self.arch, num_classes)

    def num_classes_in(self, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        return num_classes_in(state_dict)

    def owns(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Mask head or not, blocks in layer3 (R-50 vs 101) and conv2's group width (ResNeXt)."""
        if CLASSIFIER_KEY not in state_dict:
            return False
        if any(k.startswith(MASK_PREFIX) for k in state_dict) != self.has_masks:
            return False
        backbone = RESNET_SPECS[self.spec.backbone]
        last = backbone.blocks_per_stage[2] - 1
        if f"backbone.layer3.{last}.conv1.weight" not in state_dict or \
                f"backbone.layer3.{last + 1}.conv1.weight" in state_dict:
            return False
        conv2 = state_dict.get("backbone.layer1.0.conv2.weight")
        return conv2 is not None and conv2.shape[1] == backbone.inner_width(64) // backbone.groups

    # --- transform, network run, decode ----------------------------------------------------

    def keep_ratio_scale(self, cfg) -> tuple[int, int]:
        return tuple(cfg.resize_scale) if cfg.resize_scale else SCALE

    def preprocess(self, images_bgr: Sequence[np.ndarray], cfg) -> tuple[TwoStageInputs, list[TwoStageMeta]]:
        tensors, metas = resize_and_normalize(images_bgr, self.keep_ratio_scale(cfg))
        return TwoStageInputs(tensors), metas

    def working_size(self, cfg) -> tuple[int, int]:
        long_edge, short_edge = self.keep_ratio_scale(cfg)
        return max(long_edge, short_edge), min(long_edge, short_edge)  # landscape: the usual photo

    def boxes_to_input(self, boxes_xyxy, meta):
        return boxes_to_resized(boxes_xyxy, meta)

    def boxes_to_original(self, boxes_xyxy, meta):
        # Mask R-CNN divides by the scale factor, Faster R-CNN multiplies by its reciprocal (pitfall 9)
        return boxes_to_original(boxes_xyxy, meta, Rescale.DIVIDE if self.has_masks else Rescale.MULTIPLY_RECIPROCAL)

    def run(self, backend, inputs: TwoStageInputs, metas, test_cfg, nms=None) -> TwoStageOutputs:
        """The final NMS runs here, between the bbox and mask heads, so the per-image `nms` does too."""
        network = self._network(backend)
        cfg = stage_test_config(test_cfg)
        per_image_nms = nms_per_image(nms, test_cfg, len(metas))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, meta in enumerate(metas):
            groups.setdefault(padded_shape([meta.img_shape]), []).append(i)
        results: list[StageDetections | None] = [None] * len(metas)
        with torch.inference_mode():
            for members in groups.values():
                batch = pad_batch([inputs.tensors[i] for i in members])
                group_nms = [per_image_nms[i] for i in members]
                for i, dets in zip(members, detect_padded(network, batch, [metas[i] for i in members], cfg, group_nms)):
                    results[i] = dets
        return TwoStageOutputs(results)  # type: ignore[arg-type]

    def decode(self, raw: TwoStageOutputs, metas, test_cfg, nms=None):
        from service.pipeline.postprocess import ImageDetections

        if not isinstance(raw, TwoStageOutputs):
            raise ConfigError(f"arch {self.arch!r} runs through its own stages; got {type(raw).__name__} outputs")
        return [ImageDetections(d.boxes_xyxy, d.scores, d.labels, roi_masks=d.mask_probs) for d in raw.per_image]

    def masks(self, dets, meta, raw, slot, threshold):
        if not self.has_masks or dets.roi_masks is None:
            return None
        return paste_masks_rle(dets.roi_masks, dets.boxes_xyxy, (meta.ori_h, meta.ori_w), threshold,
                               TwoStageTestConfig().mask_band_bytes)

    def _network(self, backend):
        """The backend's runner with the eager model's stage methods: its module, or its ONNX sessions."""
        module = getattr(backend, "module", None)
        if module is not None:
            return module
        if hasattr(backend, "open_graph"):
            bbox = backend.open_graph(BBOX_GRAPH)
            mask = backend.open_graph(MASK_GRAPH) if self.has_masks else None
            return OnnxTwoStage.from_sessions(backend.session, bbox, mask, _classes_of_bbox_graph(bbox))
        raise ConfigError(f"backend {backend.name!r} cannot run {self.arch}'s network pieces")

    # --- ONNX export recipe ----------------------------------------------------------------

    def onnx_output_names(self) -> list[str]:
        return list(FEATURE_OUTPUTS)

    def onnx_extra_files(self) -> list[str]:
        return [BBOX_GRAPH, MASK_GRAPH] if self.has_masks else [BBOX_GRAPH]

    def export_onnx(self, model: nn.Module, cfg, out: Path, *, end2end: bool, opset: int) -> tuple[str, list[str]]:
        """features graph at `out`, RoI graphs next to it (BBOX_GRAPH, MASK_GRAPH)."""
        if end2end:
            raise ConfigError(f"arch {self.arch!r}: no end2end graph; its selection steps run host-side "
                              "(export the network pieces without --end2end)")
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".two-stage-export-") as tmp:
            files = export_two_stage(model, tmp, opset=opset)
            shutil.move(str(files.features), out)
            shutil.move(str(files.bbox), out.with_name(BBOX_GRAPH))
            if files.mask is not None:
                shutil.move(str(files.mask), out.with_name(MASK_GRAPH))
        return "torchscript", self.onnx_output_names()


def stage_test_config(test_cfg) -> TwoStageTestConfig:
    """model.toml's [test_cfg] (its `rpn` table for the proposals, the rest as mmdet's `rcnn`) -> typed."""
    return TwoStageTestConfig(
        rpn=RPNTestConfig(nms_pre=test_cfg.rpn.nms_pre, max_per_img=test_cfg.rpn.max_per_img,
                          iou_threshold=test_cfg.rpn.iou_threshold),
        score_thr=test_cfg.score_thr, iou_threshold=test_cfg.iou_threshold,
        max_per_img=min(test_cfg.max_per_img, 1000), mask_thr_binary=test_cfg.mask_thr_binary,
    )


def _classes_of_bbox_graph(session) -> int:
    """C from the bbox graph's cls_logits [K, C+1] output, when the exporter kept it static."""
    dim = session.get_outputs()[0].shape[1]
    if not isinstance(dim, int):
        raise ConfigError(f"{BBOX_GRAPH}: the class axis of cls_logits is not static ({dim})")
    return dim - 1


for _spec in REGISTRY.values():
    register(RCNNDetector(_spec))
