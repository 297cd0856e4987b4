"""The detector contract: everything family-specific about a model, behind one interface.

A family (RTMDet, two-stage R-CNN, ...) owns, per registered arch:
  - its transform: `preprocess` (resize policy, mean/std, padding) and the paired inverse inside `decode`,
  - its network: `build` and the checkpoint key layout (`num_classes_in` reads its own classifier key),
  - its decode: the backend's raw tensors -> per-image detections in original-image pixels (+ `masks`),
  - its ONNX recipe: `onnx_output_names` / `onnx_output_order` and `export_onnx`.
Backends (eager, ONNX Runtime) only run a network and return raw tensors; the predictor, the engine and
the doors talk to a `Detector` and never to a family's modules.

Adding a family: a folder under service/detectors/ whose module calls `register(...)` for its archs, and
one line in `FAMILY_MODULES` below.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from service.errors import ConfigError

if TYPE_CHECKING:
    from service.backends.base import Backend, RawOutputs
    from service.pipeline.postprocess import ImageDetections
    from service.settings import ModelConfig, TestConfig
    from service.types import RLEMask

# One line per family; each module registers its archs on import.
FAMILY_MODULES = (
    "service.detectors.rtmdet.family",
    "service.detectors.two_stage.family",
)


class ImageMetaLike(Protocol):
    """What the family-neutral code reads from a family's per-image transform record."""

    ori_h: int
    ori_w: int


@dataclass(frozen=True, slots=True)
class ImageNms:
    """One image's final NMS (after the network, on its raw outputs): test_cfg's, or a request's
    `iou_thr` / `class_agnostic` in its place. Families take one per image so that a batch holding
    different settings decodes once, each image exactly as a model configured that way would."""

    iou_threshold: float
    class_agnostic: bool = False

    @classmethod
    def of(cls, test_cfg) -> "ImageNms":
        return cls(test_cfg.iou_threshold, bool(getattr(test_cfg, "class_agnostic", False)))


def nms_per_image(nms: Sequence[ImageNms] | None, test_cfg, count: int) -> list[ImageNms]:
    """`nms` checked against the batch, or test_cfg's for every image when the caller gave none."""
    if nms is None:
        return [ImageNms.of(test_cfg)] * count
    if len(nms) != count:
        raise ValueError(f"{len(nms)} NMS settings for a batch of {count} images")
    return list(nms)


class Detector(ABC):
    """One registered arch. Stateless: the weights live in the network a backend runs."""

    arch: str
    family: str
    has_masks: bool
    classifier_key: str  # state_dict key whose rows give the class count (named in error messages)

    # --- network and checkpoint layout -----------------------------------------------------

    @abstractmethod
    def build(self, num_classes: int) -> nn.Module:
        """A randomly initialised network in eval mode, with the official checkpoint's key names."""

    @abstractmethod
    def num_classes_in(self, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """Foreground classes the weights were trained for, from this family's own keys; None if absent."""

    def owns(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Whether the weights look like this arch (for "the weights look like X" hints)."""
        return False

    # --- transform, network run, decode ------------------------------------------------------

    @abstractmethod
    def preprocess(self, images_bgr: Sequence[np.ndarray], cfg: "ModelConfig") -> tuple[Any, list[ImageMetaLike]]:
        """HxWx3 uint8 BGR images -> (network input for `run`, one meta per image)."""

    def keep_ratio_scale(self, cfg: "ModelConfig") -> tuple[int, int] | None:
        """(long, short) edge bound of this family's keep-ratio resize, with the family's default filled in;
        None for a square-input family. The front groups images by the padded shape this gives and the
        TensorRT profile spans it, so both must see the scale the transform really uses."""
        return None

    def working_size(self, cfg: "ModelConfig") -> tuple[int, int]:
        """(width, height) of an image the transform feeds to the network unchanged in shape: what a
        worker's warm-up sends, so its first real batch finds kernels tuned for that shape."""
        return cfg.input_size, cfg.input_size

    @abstractmethod
    def boxes_to_input(self, boxes_xyxy: torch.Tensor, meta: ImageMetaLike) -> torch.Tensor:
        """Original-image pixels -> network-input pixels: the forward half of the transform's box map."""

    @abstractmethod
    def boxes_to_original(self, boxes_xyxy: torch.Tensor, meta: ImageMetaLike) -> torch.Tensor:
        """Network-input pixels -> original-image pixels: the inverse `decode` applies."""

    def run(self, backend: "Backend", inputs: Any, metas: Sequence[ImageMetaLike],
            test_cfg: "TestConfig", nms: Sequence[ImageNms] | None = None) -> "RawOutputs":
        """Drive the backend over the preprocessed batch; single-graph families just call `infer`.

        Multi-piece families (two-stage) run each network piece through the backend's runner with their
        host-side selection steps in between, which is why the metas, test_cfg and the per-image final
        NMS settings (`nms`, see `decode`) are passed here too.
        """
        return backend.infer(inputs)

    @abstractmethod
    def decode(self, raw: "RawOutputs", metas: Sequence[ImageMetaLike],
               test_cfg: "TestConfig", nms: Sequence[ImageNms] | None = None) -> list["ImageDetections"]:
        """Raw outputs of a batch -> per image, score-sorted detections with xyxy boxes in original pixels.
        `nms`: one final-NMS setting per image (None: test_cfg's for all); families whose NMS already
        ran in `run` ignore it here."""

    def masks(self, dets: "ImageDetections", meta: ImageMetaLike, raw: "RawOutputs", slot: int,
              threshold: float) -> list["RLEMask"] | None:
        """RLE masks (original pixels) for `dets`, the already filtered detections of batch slot `slot`."""
        return None

    # --- ONNX export recipe ----------------------------------------------------------------

    def onnx_output_names(self) -> list[str]:
        """Output names of the network-only graph, in the order `decode` takes the tensors."""
        raise ConfigError(f"arch {self.arch!r} has no ONNX export recipe")

    def input_description(self, cfg: "ModelConfig") -> str:
        """What the network takes, for messages (e.g. `detserve export`)."""
        return "dynamic height/width input"

    def onnx_extra_files(self) -> list[str]:
        """File names of further graphs the recipe writes next to the main one (multi-piece families)."""
        return []

    def onnx_output_order(self, graph_names: list[str]) -> list[str]:
        """The graph's output names in `decode` order; raises ConfigError if the graph is not this arch's."""
        wanted = self.onnx_output_names()
        if sorted(graph_names) != sorted(wanted):
            raise ConfigError(f"ONNX graph outputs {graph_names} are not {self.arch}'s {wanted}")
        return wanted

    def check_onnx_input(self, shape: list, cfg: "ModelConfig", file_name: str) -> None:
        """Raise ConfigError when a graph's input shape cannot take this family's preprocessed batch."""
        if len(shape) != 4:
            raise ConfigError(f"model {cfg.name!r}: {file_name} input {shape} is not [N, 3, H, W]")

    def export_onnx(self, model: nn.Module, cfg: "ModelConfig", out: Path, *, end2end: bool,
                    opset: int) -> tuple[str, list[str]]:
        """Write `model` as ONNX to `out`; returns (exporter used, output names)."""
        raise ConfigError(f"arch {self.arch!r} has no ONNX export recipe")


_REGISTRY: dict[str, Detector] = {}
_loaded = False


def register(detector: Detector) -> Detector:
    """Add one arch to the registry (families call this at import, once per arch)."""
    if detector.arch in _REGISTRY and type(_REGISTRY[detector.arch]) is not type(detector):
        raise ValueError(f"arch {detector.arch!r} registered twice")
    _REGISTRY[detector.arch] = detector
    return detector


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _loaded = True


def list_archs() -> list[str]:
    _load_families()
    return list(_REGISTRY)


def get_detector(arch: str) -> Detector:
    """The registered detector for `arch`; ConfigError listing the known archs otherwise."""
    _load_families()
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ConfigError(f"unknown detector arch {arch!r}; known: {', '.join(_REGISTRY)}") from None
