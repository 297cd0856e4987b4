"""The backend contract: a preprocessed batch in, the network's raw tensors out.

Eager PyTorch, ONNX Runtime (CPU/CUDA/TensorRT EPs) and foreign end2end graphs all implement
`Backend`; callers (the Predictor) never know which one runs. What the tensors mean belongs to
the detector family (service/detectors/base.py), which decodes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class InputDetections:
    """End2end graphs (MMDeploy layout): detections in network-input pixels, before rescale."""

    dets: torch.Tensor  # [B, K, 5] x1, y1, x2, y2, score
    labels: torch.Tensor  # [B, K] int
    masks: torch.Tensor | None = None  # [B, K, S, S] probabilities at input resolution

    @property
    def batch_size(self) -> int:
        return self.dets.shape[0]


class BatchedOutputs(Protocol):
    """What a multi-piece family's `run` returns (e.g. two-stage detections before mask pasting)."""

    @property
    def batch_size(self) -> int: ...


# A network-only graph's outputs in the family's `onnx_output_names()` order, an end2end graph's, or
# what a multi-piece family assembled from several graph runs.
RawOutputs = tuple[torch.Tensor, ...] | InputDetections | BatchedOutputs


@runtime_checkable
class Backend(Protocol):
    """`load` once per worker, `infer` per batch, `close` at shutdown."""

    name: str
    device: str

    def load(self) -> None: ...

    def infer(self, batch: torch.Tensor) -> RawOutputs:
        """`batch` is [B, 3, H, W] float32 as the family preprocessed it, on the CPU. Returns B results."""
        ...

    def close(self) -> None: ...


def raw_batch_size(outputs: RawOutputs) -> int:
    if isinstance(outputs, tuple):
        if not outputs:
            raise RuntimeError("backend returned no output tensors")
        return int(outputs[0].shape[0])
    return int(outputs.batch_size)


def check_batch(outputs: RawOutputs, expected: int, backend: str) -> RawOutputs:
    """Fail loudly when a backend returns a different batch size than it was given."""
    got = raw_batch_size(outputs)
    if got != expected:
        raise RuntimeError(f"backend {backend!r} returned {got} results for a batch of {expected}")
    return outputs
