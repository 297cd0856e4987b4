"""Eager PyTorch backend: the registry's network with official weights, on CPU or one CUDA device.

The detector family (service/detectors/base.py) builds the network and names its outputs; this
module only loads, places and runs it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..detectors.base import get_detector
from ..detectors.checkpoint import Checkpoint, load_checkpoint, load_weights
from ..detectors.coco import COCO_CLASSES
from ..errors import ConfigError
from ..settings import EagerConfig, ModelConfig
from .base import check_batch
from .fold import fold_batchnorm

log = logging.getLogger(__name__)


def default_channels_last(device: str) -> bool:
    """Channels-last where it measured faster: CPU yes, CUDA not measured yet (stays off; `make
    gpu-check` prints the eager channels-last rows that would decide it).

    rtmdet-tiny network at 320 on the shared 2-core box, median ms/image over 3 alternating rounds
    (other engineers' jobs ran too, so +-10% noise; channels-last won in every one of 5 runs):
                               batch 1: NCHW  channels-last    batch 8: NCHW  channels-last
        1 thread, BN folded            110.4  101.7                     115.4  95.9
        1 thread, BN kept              118.9   92.9                     114.6  98.9
        2 threads, BN folded            78.1   64.9                     155.1  51.8  (155: an outlier)
        2 threads, BN kept              88.9   75.4                      73.0  60.8
    Folding BN alone is within that noise on CPU; it removes one pass over the activations per layer
    and changes no output beyond float32 rounding, so it stays on everywhere (GPU: see gpu-check).
    """
    return not device.startswith("cuda")


def accelerate(model: nn.Module, options: EagerConfig, device: str, max_batch_size: int = 8):
    """torch.compile / CUDA graphs (`[eager] compile`, `cuda_graphs`) over fixed batch buckets (backends/buckets.py)."""
    if options.compile or options.cuda_graphs:
        from .buckets import BucketedRunner

        return BucketedRunner(model, options, device, max_batch_size)
    return model


class EagerBackend:
    """Implements `service.backends.base.Backend`. `infer` returns the network's tensors in float32 on `device`."""

    name = "eager"

    def __init__(self, cfg: ModelConfig, device: str, *, checkpoint: Checkpoint | None = None):
        self.cfg = cfg
        self.device = device
        self._checkpoint = checkpoint  # pre-read by the Predictor; else read in load()
        self._model: nn.Module | None = None
        self.fp16 = cfg.eager.fp16 and device.startswith("cuda")
        self.channels_last = default_channels_last(device) if cfg.eager.channels_last is None else cfg.eager.channels_last
        self.folded_batchnorms = 0

    def load(self) -> None:
        checkpoint = self._checkpoint
        if checkpoint is None:
            if not self.cfg.weights:
                raise ConfigError(f"model {self.cfg.name!r}: field 'weights' is required for arch {self.cfg.arch!r}")
            checkpoint = load_checkpoint(self.cfg.path(self.cfg.weights))
        try:
            detector = get_detector(self.cfg.arch)
        except ConfigError as exc:
            raise ConfigError(f"model {self.cfg.name!r}: field 'arch': {exc}") from None
        num_classes = detector.num_classes_in(checkpoint.state_dict) or len(checkpoint.classes or COCO_CLASSES)
        model = detector.build(num_classes)
        load_weights(model, checkpoint, strict=True)
        model.eval().requires_grad_(False)
        if self.cfg.eager.fold_batchnorm:
            model, self.folded_batchnorms = fold_batchnorm(model)  # in float32, before any .half()
        model.to(self.device)
        if self.fp16:
            model.half()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._model = accelerate(model, self.cfg.eager, self.device, self.cfg.batch.max_batch_size)
        self._checkpoint = None  # the weights now live in the model; drop the CPU copy

    @property
    def module(self) -> nn.Module:
        """The loaded network, for families that drive its pieces themselves (two-stage)."""
        if self._model is None:
            raise RuntimeError("EagerBackend.module used before load()")
        return self._model

    def infer(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._model is None:
            raise RuntimeError("EagerBackend.infer called before load()")
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.fp16:
                x = x.half()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outputs = self._model(x)
            # Postprocessing (top-k, NMS, mask thresholds) always runs in float32.
            raw = tuple(o.float() for o in outputs)
        return check_batch(raw, batch.shape[0], self.name)

    def close(self) -> None:
        self._model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
