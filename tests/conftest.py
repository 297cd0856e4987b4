"""Shared fixtures. Fakes live in tests/fakes.py; test modules never import each other."""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Tests share 2 cores with each other and with worker processes: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# backend = "auto" exports each model to ONNX on its first load. One cache for the whole session,
# set in the environment so the servers and workers tests start share it: the bundled models export once
# per session, and never into the developer's ~/.cache.
_SESSION_CACHE = None
if not os.environ.get("DETSERVE_CACHE_DIR"):
    _SESSION_CACHE = tempfile.mkdtemp(prefix="detserve-test-cache-")
    os.environ["DETSERVE_CACHE_DIR"] = _SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


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
