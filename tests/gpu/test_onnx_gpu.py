"""ONNX Runtime on a GPU: the CUDA and TensorRT execution providers really run and keep parity.
Skipped (conftest) without a CUDA device; the TensorRT test also needs libnvinfer."""
from __future__ import annotations

import pytest
import torch

from service.backends.onnxrt import TENSORRT_LIBS, OnnxRuntimeBackend, loadable
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector
from service.export.onnx_export import export_onnx
from service.export.parity import calibrate_random_head, onnx_config, shape_images
from service.pipeline.transforms import preprocess_batch
from service.settings import load_model_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-gpu")
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", 3)
    calibrate_random_head(model, 320)
    save_checkpoint(root / "w.pth", model.state_dict(), ["a", "b", "c"])
    (root / "model.toml").write_text('arch = "rtmdet-tiny"\nweights = "w.pth"\ninput_size = 320\ndevice = "cuda"\n')
    cfg = load_model_config(root)
    return cfg, export_onnx(cfg).path, model


def run(cfg, path, providers, model, atol):
    backend = OnnxRuntimeBackend(onnx_config(cfg, path, end2end=False, providers=providers), "cuda:0")
    backend.load()
    x, _ = preprocess_batch(shape_images(4), cfg.input_size)
    got = backend.infer(x)
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=atol)
    return backend


def test_cuda_execution_provider(exported):
    cfg, path, model = exported
    backend = run(cfg, path, ["cuda", "cpu"], model, atol=1e-3)
    assert backend.providers[0] == "CUDAExecutionProvider"


@pytest.mark.skipif(loadable(TENSORRT_LIBS) is None, reason="TensorRT (libnvinfer) not installed")
def test_tensorrt_execution_provider_with_engine_cache(exported):
    cfg, path, model = exported
    cfg = cfg.model_copy(update={"onnxruntime": cfg.onnxruntime.model_copy(update={"trt_fp16": False})})
    backend = run(cfg, path, ["tensorrt", "cuda", "cpu"], model, atol=1e-2)
    assert backend.providers[0] == "TensorrtExecutionProvider"
    assert any(cfg.path(cfg.onnxruntime.trt_cache_dir).iterdir())
