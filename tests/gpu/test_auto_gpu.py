"""backend = "auto" on a real GPU: the bundled rtmdet resolves to a CUDA-side backend that really runs
(TensorRT / CUDA EP after parity, else eager CUDA with the reason). Skipped (conftest) without CUDA."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.pipeline.predictor import Predictor
from service.settings import load_model_config

pytestmark = pytest.mark.gpu

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "rtmdet"


@pytest.mark.skipif(not (BUNDLED / "weights.pth").is_file(), reason="models/rtmdet not shipped")
def test_auto_on_cuda_picks_a_gpu_backend_and_reuses_it():
    # The session's cache (conftest), or gpu-check's: its parity stage then reuses these TensorRT builds.
    first = Predictor.from_config(load_model_config(BUNDLED), device="cuda:0")
    try:
        if first.backend_name == "onnxruntime":
            # the loader checked the session runs the provider of this verdict (else it served eager)
            assert first.backend_reason.startswith(("auto: onnxruntime tensorrt-", "auto: onnxruntime cuda ("))
        else:
            assert first.backend_name == "eager" and first.backend_reason.startswith("auto: eager, because ")
    finally:
        first.close()
    again = Predictor.from_config(load_model_config(BUNDLED), device="cuda:0")
    again.close()
    assert (again.backend_name, again.backend_reason) == (first.backend_name, first.backend_reason)
