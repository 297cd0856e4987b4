"""The registry's front door: arch name -> `Detector` (service/detectors/base.py) -> built network.

Family-neutral: every family registers its archs through `base.register`.
"""
from __future__ import annotations

from torch import nn

from .base import Detector, get_detector, list_archs

__all__ = ["Detector", "build_detector", "get_detector", "list_archs"]


def build_detector(arch: str, num_classes: int = 80) -> nn.Module:
    """A randomly initialised network of `arch` in eval mode (serving default); `.train()` to train it."""
    return get_detector(arch).build(num_classes)
