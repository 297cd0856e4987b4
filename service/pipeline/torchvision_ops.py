"""torchvision's compiled NMS and RoIAlign kernels, without importing the torchvision package on CPU.

Why: `import torchvision` runs `torchvision.ops`, which imports `torch._dynamo` (and with it sympy,
torch.onnx and torch._inductor), for the three kernels a worker needs: served, that cost each worker
~83 MB of private memory and ~2 s of start-up (2026-12-04, bench/analysis.md "Worker memory"). The
kernels live in torchvision's C++ extension, which registers `torch.ops.torchvision.*` when loaded,
so this module loads that one library. It imports the package as before where the first call is on a
CUDA tensor (for its check that torch and torchvision were built for the same CUDA), where the
library is not found (another layout, a source build), and for a call under autocast or on tensors
that need gradients: those registrations are Python code in the package, not in the library.

Plain inference calls only: `batched_nms` keeps torchvision's split rule and tie order, so results are
the package's exactly (tests/unit/test_torchvision_ops.py compares them), but it is not scripted for
tracing as torchvision's is. Code that is traced or exported calls `torchvision.ops` itself.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import threading

import torch

_LIBRARIES = ("_C_stable", "_C")  # torchvision 0.29 ships _C_stable; older builds name it _C
_lock = threading.Lock()
_library_loaded = False
_package_imported = False


def _find_library() -> str | None:
    spec = importlib.util.find_spec("torchvision")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    finder = importlib.machinery.FileFinder(spec.submodule_search_locations[0], loader)
    for name in _LIBRARIES:
        found = finder.find_spec(name)
        if found is not None and found.origin:
            return found.origin
    return None


def _ensure(tensor: torch.Tensor) -> None:
    global _library_loaded, _package_imported
    if not _package_imported and (tensor.requires_grad or torch.is_autocast_enabled(tensor.device.type)):
        import torchvision  # noqa: F401  (its autograd and autocast registrations)

        _package_imported = _library_loaded = True
    if _library_loaded:
        return
    with _lock:
        if _library_loaded:
            return
        path = _find_library() if tensor.device.type == "cpu" else None
        if path is not None:
            try:
                torch.ops.load_library(path)  # a no-op when torchvision itself loaded it already
            except OSError:
                path = None
        if path is None:
            import torchvision  # noqa: F401  (loads the library and checks its CUDA build)

            _package_imported = True
        if not hasattr(torch.ops.torchvision, "nms"):
            raise RuntimeError(f"torchvision's C++ operators did not load (from {path or 'the package'}): install "
                               f"the torchvision built for torch {torch.__version__}; `detserve doctor` checks the pair")
        _library_loaded = True


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """`torchvision.ops.nms`: indices kept, by decreasing score."""
    _ensure(boxes)
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """`torchvision.ops.batched_nms`: boxes of different `idxs` never suppress each other."""
    # torchvision's own rule (vision#1311, #8925): many boxes on CPU run per class, which is faster there.
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000) and not torch._C._get_tracing_state():
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            members = torch.where(idxs == class_id)[0]
            keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # one offset per class, larger than any coordinate, so boxes of two classes never overlap
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """`torchvision.ops.roi_align` for rois given as one [K, 5] tensor (batch index, x1, y1, x2, y2)."""
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5], got {tuple(rois.shape)}")
    if torch.are_deterministic_algorithms_enabled() and features.device.type != "cpu":
        from torchvision.ops import roi_align as deterministic  # its Python kernel: the CUDA one is not

        return deterministic(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    _ensure(features)
    return torch.ops.torchvision.roi_align(features, rois, spatial_scale, output_size[0], output_size[1],
                                           sampling_ratio, aligned)
