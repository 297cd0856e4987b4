"""Export a model folder's detector to ONNX: the network only (default) or MMDeploy-style end2end.

The TorchScript exporter (`torch.onnx.export(dynamo=False)`) is used first: it handles the
data-dependent NMS through a symbolic and gives a compact graph; the dynamo exporter is the
fallback when the TorchScript one is unavailable. The batch axis is dynamic, the image size fixed.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..detectors.base import get_detector
from ..detectors.checkpoint import load_checkpoint, load_weights
from ..errors import ConfigError
from ..settings import ModelConfig
from .end2end import nms_onnx_translation, register_onnx_symbolics

log = logging.getLogger(__name__)

MIN_OPSET = 17
INPUT_NAME = "input"
NETWORK_FILE = "model.onnx"
END2END_FILE = "end2end.onnx"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    end2end: bool
    opset: int
    exporter: str  # "torchscript" | "dynamo"
    output_names: tuple[str, ...]
    classes: tuple[str, ...]
    extra_files: tuple[Path, ...] = ()  # further graphs of multi-piece families, next to `path`


def load_detector(cfg: ModelConfig) -> tuple[nn.Module, tuple[str, ...]]:
    """The eager detector with the model's weights (CPU, eval) and its class names."""
    from ..pipeline.predictor import resolve_classes

    if not cfg.weights:
        raise ConfigError(f"model {cfg.name!r}: export needs PyTorch weights (field 'weights')")
    checkpoint = load_checkpoint(cfg.path(cfg.weights))
    classes = resolve_classes(cfg, checkpoint.classes)
    detector = get_detector(cfg.arch)
    model = detector.build(detector.num_classes_in(checkpoint.state_dict) or len(classes))
    load_weights(model, checkpoint, strict=True)
    return model.eval().requires_grad_(False), classes


def default_output_path(cfg: ModelConfig, end2end: bool) -> Path:
    return cfg.root / (END2END_FILE if end2end else NETWORK_FILE)


def export_onnx(cfg: ModelConfig, *, end2end: bool = False, opset: int = MIN_OPSET, out: Path | None = None,
                model: nn.Module | None = None, classes: tuple[str, ...] | None = None) -> ExportResult:
    """Write the ONNX file for `cfg` and return where it went. `model`/`classes` skip reading the weights."""
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    detector = get_detector(cfg.arch)
    if model is None:
        model, classes = load_detector(cfg)
    out = Path(out) if out is not None else default_output_path(cfg, end2end)
    out.parent.mkdir(parents=True, exist_ok=True)
    exporter, names = detector.export_onnx(model, cfg, out, end2end=end2end, opset=opset)  # the family's recipe
    written_opset = _write_metadata(out, cfg, classes or (), end2end, detector.has_masks)
    extra = tuple(out.with_name(name) for name in detector.onnx_extra_files())
    return ExportResult(out, end2end, written_opset, exporter, tuple(names), tuple(classes or ()), extra)


def export_image_graph(module: nn.Module, example: torch.Tensor, out: Path, names: list[str], opset: int) -> str:
    """Export a one-input (image batch) graph with a dynamic batch axis; returns the exporter used."""
    dynamic_axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    register_onnx_symbolics(opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints from shapes are expected
        try:
            torch.onnx.export(
                module, (example,), str(out), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
            return "torchscript"
        except (TypeError, RuntimeError, AttributeError) as exc:
            # TorchScript exporter removed or unable: the dynamo exporter with a symbolic batch dim.
            log.warning("TorchScript ONNX exporter failed (%s); trying dynamo=True", exc)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=names,
        dynamic_shapes=({0: batch},), external_data=False, custom_translation_table=nms_onnx_translation(),
    )
    program.save(str(out))
    return "dynamo"


def _write_metadata(path: Path, cfg: ModelConfig, classes, end2end: bool, has_masks: bool) -> int:
    """Record what the graph expects, so a folder holding only the .onnx is still self-describing."""
    import onnx

    proto = onnx.load(str(path))
    meta = {
        "detserve.arch": cfg.arch,
        "detserve.input_size": str(cfg.input_size),
        "detserve.layout": "end2end" if end2end else "network",
        "detserve.has_masks": str(has_masks).lower(),
        "detserve.classes": json.dumps(list(classes)),
        "detserve.normalization": "bgr mean/std outside the graph",
    }
    if end2end:
        # The tracer leaves K symbolic; it is fixed (max_per_img, zero-padded) and consumers may rely on it.
        k, size = cfg.test_cfg.max_per_img, cfg.input_size
        fixed = {"dets": [k, 5], "labels": [k], "masks": [k, size, size]}
        for output in proto.graph.output:
            dims = output.type.tensor_type.shape.dim
            for dim, value in zip(list(dims)[1:], fixed.get(output.name, [])):
                dim.Clear()
                dim.dim_value = value
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    # the dynamo exporter may keep a newer opset than requested when it cannot down-convert
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
