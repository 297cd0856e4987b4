"""ONNX export of the two-stage network and an ONNX Runtime runner with the eager model's interface.

The network is exported as graphs with no data-dependent control flow in them, split where mmdet's
own selection steps sit (spec §5.1: preprocessing and selection are host-side):
  features.onnx  input [B, 3, H, W]        -> P2..P6, RPN logits and deltas per level  (all axes dynamic)
  bbox.onnx      P2..P5, rois [K, 5]       -> cls logits [K, C+1], deltas [K, 4C]      (RoiAlign, opset >= 16)
  mask.onnx      P2..P5, rois [N, 5]       -> mask logits [N, C, 28, 28]               (Mask R-CNN only)
Proposal selection, class-wise NMS and mask pasting run in `decode` for both backends, so eager and ONNX
Runtime share every line of post-processing. In the RoI graphs every RoI is pooled on all four levels and
the mapped level is selected with `where` (exact, 4x the RoiAlign work): a per-level gather would bake the
traced RoI counts into the graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.errors import ConfigError

from .model import RPNOutputs, TwoStageDetector
from .roi_head import BBOX_ROI_SIZE, MASK_ROI_SIZE, ROI_STRIDES, map_roi_levels
from .rpn import ANCHOR_STRIDES

MIN_OPSET = 16  # below 16 torchvision exports aligned=True RoIAlign with the wrong (legacy) coordinates
NUM_LEVELS = len(ANCHOR_STRIDES)
FEATURE_NAMES = [f"p{i + 2}" for i in range(NUM_LEVELS)]
ROI_FEATURE_NAMES = FEATURE_NAMES[: len(ROI_STRIDES)]


def roi_features_all_levels(feats: tuple[torch.Tensor, ...], rois: torch.Tensor, output_size: int) -> torch.Tensor:
    """Same values as `roi_head.roi_features`, computed without data-dependent indexing."""
    # The package, not service.pipeline.torchvision_ops: it registers RoiAlign's ONNX symbolic. Only
    # export traces this function, and export_two_stage has imported the package before the trace.
    from torchvision.ops import roi_align

    levels = map_roi_levels(rois, len(ROI_STRIDES)).view(-1, 1, 1, 1)
    out = None
    for level, stride in enumerate(ROI_STRIDES):
        pooled = roi_align(feats[level], rois, (output_size, output_size), spatial_scale=1 / stride,
                           sampling_ratio=0, aligned=True)
        out = pooled if out is None else torch.where(levels == level, pooled, out)
    return out


class _FeatureGraph(nn.Module):
    def __init__(self, model: TwoStageDetector):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor):
        rpn = self.model.rpn_forward(inputs)
        return (*rpn.feats, *rpn.cls_per_level, *rpn.reg_per_level)


class _BBoxGraph(nn.Module):
    def __init__(self, model: TwoStageDetector):
        super().__init__()
        self.bbox_head = model.roi_head.bbox_head

    def forward(self, p2, p3, p4, p5, rois):
        return self.bbox_head(roi_features_all_levels((p2, p3, p4, p5), rois, BBOX_ROI_SIZE))


class _MaskGraph(nn.Module):
    def __init__(self, model: TwoStageDetector):
        super().__init__()
        self.mask_head = model.roi_head.mask_head

    def forward(self, p2, p3, p4, p5, rois):
        return self.mask_head(roi_features_all_levels((p2, p3, p4, p5), rois, MASK_ROI_SIZE))


@dataclass(frozen=True)
class TwoStageOnnxFiles:
    features: Path
    bbox: Path
    mask: Path | None
    opset: int


def export_two_stage(model: TwoStageDetector, out_dir: str | Path, *, opset: int = 17,
                     example_hw: tuple[int, int] = (128, 160)) -> TwoStageOnnxFiles:
    """Write features.onnx, bbox.onnx (and mask.onnx) under out_dir; the example size only seeds the trace."""
    if opset < MIN_OPSET:
        raise ConfigError(f"opset must be >= {MIN_OPSET} (RoiAlign half_pixel), got {opset}")
    if example_hw[0] % 32 or example_hw[1] % 32:
        raise ConfigError(f"example_hw must be multiples of 32, got {example_hw}")
    # Before tracing: a first import inside the trace fails (torchvision's CUDA-build check calls an op
    # the tracer cannot record). Serving workers do not import it (service/pipeline/torchvision_ops.py).
    import torchvision.ops  # noqa: F401
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(1, 3, *example_hw)
    level_outs = ([f"cls{i}" for i in range(NUM_LEVELS)], [f"reg{i}" for i in range(NUM_LEVELS)])
    spatial = {0: "batch", 2: "height", 3: "width"}
    feature_outputs = FEATURE_NAMES + level_outs[0] + level_outs[1]
    features = out_dir / "features.onnx"
    _export(_FeatureGraph(model), (example,), features, ["input"], feature_outputs,
            {name: {0: "batch", 2: f"h_{name}", 3: f"w_{name}"} for name in feature_outputs} | {"input": spatial},
            opset)
    with torch.no_grad():
        feats = model.rpn_forward(example).feats[: len(ROI_STRIDES)]
    h, w = example_hw
    rois = torch.tensor([[0.0, 2, 3, 40, 50], [0.0, 0, 0, w, h], [0.0, 10, 5, 30, 12]])
    roi_axes = {name: {0: "batch", 2: f"h_{name}", 3: f"w_{name}"} for name in ROI_FEATURE_NAMES}
    roi_axes["rois"] = {0: "rois"}
    bbox = out_dir / "bbox.onnx"
    _export(_BBoxGraph(model), (*feats, rois), bbox, ROI_FEATURE_NAMES + ["rois"], ["cls_logits", "bbox_deltas"],
            roi_axes | {"cls_logits": {0: "rois"}, "bbox_deltas": {0: "rois"}}, opset)
    mask = None
    if model.with_mask:
        mask = out_dir / "mask.onnx"
        _export(_MaskGraph(model), (*feats, rois), mask, ROI_FEATURE_NAMES + ["rois"], ["mask_logits"],
                roi_axes | {"mask_logits": {0: "rois"}}, opset)
    return TwoStageOnnxFiles(features, bbox, mask, opset)


def _export(module: nn.Module, args, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    # the exporter restores the wrapper's mode afterwards, recursively: a wrapper left in train mode
    # would put the detector's BatchNorms into training mode once export returns
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints in F.interpolate
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)


class OnnxTwoStage:
    """ONNX Runtime sessions behind the eager model's stage methods, so `api.predict` runs either unchanged."""

    def __init__(self, files: TwoStageOnnxFiles, num_classes: int, providers: list[str] | None = None):
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        self.num_classes = num_classes
        self._features = ort.InferenceSession(str(files.features), providers=providers)
        self._bbox = ort.InferenceSession(str(files.bbox), providers=providers)
        self._mask = ort.InferenceSession(str(files.mask), providers=providers) if files.mask else None

    @classmethod
    def from_sessions(cls, features, bbox, mask, num_classes: int) -> "OnnxTwoStage":
        """Over sessions someone else opened (the ONNX Runtime backend, with its providers and threads)."""
        runner = cls.__new__(cls)
        runner.num_classes = num_classes
        runner._features, runner._bbox, runner._mask = features, bbox, mask
        return runner

    @property
    def with_mask(self) -> bool:
        return self._mask is not None

    def rpn_forward(self, inputs: torch.Tensor) -> RPNOutputs:
        outs = [torch.from_numpy(o) for o in self._features.run(None, {"input": _np(inputs)})]
        n = NUM_LEVELS
        return RPNOutputs(tuple(outs[:n]), outs[n:2 * n], outs[2 * n:3 * n])

    def bbox_forward(self, feats, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rois.shape[0] == 0:
            return torch.zeros(0, self.num_classes + 1), torch.zeros(0, 4 * self.num_classes)
        cls_logits, deltas = self._bbox.run(None, self._roi_feed(feats, rois))
        return torch.from_numpy(cls_logits), torch.from_numpy(deltas)

    def mask_forward(self, feats, rois: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("this export has no mask graph")
        if rois.shape[0] == 0:
            return torch.zeros(0, self.num_classes, 2 * MASK_ROI_SIZE, 2 * MASK_ROI_SIZE)
        (logits,) = self._mask.run(None, self._roi_feed(feats, rois))
        return torch.from_numpy(logits)

    @staticmethod
    def _roi_feed(feats, rois: torch.Tensor) -> dict[str, np.ndarray]:
        feed = {name: _np(f) for name, f in zip(ROI_FEATURE_NAMES, feats)}
        feed["rois"] = _np(rois.float())
        return feed


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())
