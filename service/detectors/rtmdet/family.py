"""RTMDet / RTMDet-Ins behind the detector contract (service/detectors/base.py).

Transform: keep-ratio resize into an SxS square padded with 114, BGR mean/std (pipeline/transforms.py),
inverse `rescale_boxes`. Network: `specs.build_rtmdet`, official mmdet key names. Decode: point priors,
top-k, NMS (pipeline/postprocess.py); masks from the dynamic-conv kernels (pipeline/masks.py). Export:
the network-only graph (cls_i, bbox_i[, kernel_i, mask_feat]) or the end2end one (dets, labels[, masks]).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.errors import ConfigError

from ..base import Detector, register
from .outputs import HeadOutputs
from .specs import SPECS, ArchSpec, build_rtmdet

CLASSIFIER_KEY = "bbox_head.rtm_cls.0.weight"
STEM_KEY = "backbone.stem.0.conv.weight"
MASK_HEAD_PREFIX = "bbox_head.mask_head."
_NETWORK_NAME = re.compile(r"^(cls|bbox|kernel)_(\d+)$")


class RTMDetDetector(Detector):
    family = "rtmdet"
    classifier_key = CLASSIFIER_KEY

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self.arch = spec.name
        self.has_masks = spec.has_masks

    # --- network and checkpoint layout -----------------------------------------------------

    def build(self, num_classes: int) -> nn.Module:
        return build_rtmdet(self.spec, num_classes)

    def num_classes_in(self, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """Rows of the level-0 classifier (sigmoid classification: no background row)."""
        weight = state_dict.get(CLASSIFIER_KEY)
        return int(weight.shape[0]) if weight is not None else None

    def owns(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Sizes differ in stem width; detection and Ins differ in the mask head."""
        stem = state_dict.get(STEM_KEY)
        if stem is None:
            return False
        has_masks = any(k.startswith(MASK_HEAD_PREFIX) for k in state_dict)
        return has_masks == self.has_masks and int(64 * self.spec.widen_factor // 2) == stem.shape[0]

    # --- transform, decode -------------------------------------------------------------------

    def preprocess(self, images_bgr: Sequence[np.ndarray], cfg):
        from service.pipeline.transforms import preprocess_batch

        return preprocess_batch(list(images_bgr), cfg.input_size)

    def boxes_to_input(self, boxes_xyxy, meta):
        from service.pipeline.transforms import scale_boxes

        return scale_boxes(boxes_xyxy, meta)

    def boxes_to_original(self, boxes_xyxy, meta):
        from service.pipeline.transforms import rescale_boxes

        return rescale_boxes(boxes_xyxy, meta)

    def decode(self, raw, metas, test_cfg, nms=None):
        from service.backends.base import InputDetections
        from service.pipeline.postprocess import postprocess_head_outputs, postprocess_input_detections

        if isinstance(raw, InputDetections):
            return postprocess_input_detections(raw, metas, test_cfg, nms)
        return postprocess_head_outputs(self._head(raw), metas, test_cfg, self.spec.strides, nms)

    def masks(self, dets, meta, raw, slot, threshold):
        from service.pipeline.masks import instance_masks, masks_from_input_probs

        if not self.has_masks:
            return None
        if dets.input_masks is not None:
            return masks_from_input_probs(dets.input_masks, meta, threshold)
        if isinstance(raw, tuple):
            head = self._head(raw)
            if head.mask_feat is not None:
                return instance_masks(head.mask_feat[slot], dets.kernels, dets.priors, meta, threshold)
        return None

    def _head(self, raw) -> HeadOutputs:
        head = raw if isinstance(raw, HeadOutputs) else HeadOutputs.from_flat(raw, len(self.spec.strides))
        if (head.mask_feat is not None) != self.has_masks:
            raise ConfigError(f"arch {self.arch!r} {'has' if self.has_masks else 'has no'} masks but the network "
                              f"returned {len(head.flat())} outputs")
        return head

    # --- ONNX export recipe ----------------------------------------------------------------

    def onnx_output_names(self) -> list[str]:
        """Names in `HeadOutputs.flat()` order; the ONNX Runtime backend maps outputs back by name."""
        levels = len(self.spec.strides)
        names = [f"cls_{i}" for i in range(levels)] + [f"bbox_{i}" for i in range(levels)]
        if self.has_masks:
            names += [f"kernel_{i}" for i in range(levels)] + ["mask_feat"]
        return names

    def onnx_output_order(self, graph_names: list[str]) -> list[str]:
        """By our names (cls_i, bbox_i, kernel_i, mask_feat); a foreign graph of the right count as stored."""
        return network_output_order(graph_names, len(self.spec.strides))

    def input_description(self, cfg) -> str:
        return f"{cfg.input_size}x{cfg.input_size} input"

    def check_onnx_input(self, shape: list, cfg, file_name: str) -> None:
        super().check_onnx_input(shape, cfg, file_name)
        for dim in shape[2:]:
            if isinstance(dim, int) and dim != cfg.input_size:
                raise ConfigError(f"model {cfg.name!r}: {file_name} takes {shape[2]}x{shape[3]} images but "
                                  f"field 'input_size' is {cfg.input_size}; set input_size = {dim}")

    def export_onnx(self, model: nn.Module, cfg, out: Path, *, end2end: bool, opset: int) -> tuple[str, list[str]]:
        from service.export.end2end import END2END_MASK_OUTPUT, END2END_OUTPUTS, End2End
        from service.export.onnx_export import export_image_graph

        if end2end:
            module: nn.Module = End2End(model, cfg.input_size, cfg.test_cfg, self.has_masks, self.spec.strides).eval()
            names = [*END2END_OUTPUTS, END2END_MASK_OUTPUT] if self.has_masks else list(END2END_OUTPUTS)
        else:
            module, names = model, self.onnx_output_names()
        # Batch 2 while tracing so no size-1 dimension gets folded into a constant.
        example = torch.randn(2, 3, cfg.input_size, cfg.input_size)
        return export_image_graph(module, example, out, names, opset), names


def network_output_order(names: list[str], levels: int = 3) -> list[str]:
    """Output names in `HeadOutputs.flat()` order: by our names (cls_i, bbox_i, kernel_i, mask_feat), else as stored."""
    if len(names) not in (2 * levels, 3 * levels + 1):
        raise ConfigError(f"ONNX graph outputs {names}: expected dets/labels[/masks] (end2end) or "
                          f"{2 * levels} (detection) / {3 * levels + 1} (instance segmentation) head outputs")
    groups: dict[str, dict[int, str]] = {}
    for name in names:
        match = _NETWORK_NAME.match(name)
        if match:
            groups.setdefault(match.group(1), {})[int(match.group(2))] = name
    if set(groups) >= {"cls", "bbox"}:
        ordered = []
        for kind in ("cls", "bbox", "kernel"):
            ordered += [groups.get(kind, {})[i] for i in sorted(groups.get(kind, {}))]
        if "mask_feat" in names:
            ordered.append("mask_feat")
        if sorted(ordered) == sorted(names):
            return ordered
    return list(names)  # foreign graph without our names: trust the stored order


for _spec in SPECS.values():
    register(RTMDetDetector(_spec))
