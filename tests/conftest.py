"""Shared fixtures. Fakes live in tests/fakes.py; test modules never import each other."""
from __future__ import annotations

import os

import pytest

# Tests share 2 cores with each other and with spawned workers: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
