"""The backend contract: the eager backend, create_backend, and foreign backends plugged into the Predictor."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from service.backends import create_backend
from service.backends.base import Backend, InputDetections
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector, get_detector
from service.detectors.rtmdet.outputs import HeadOutputs
from service.errors import ConfigError, InternalError, InvalidImage
from service.pipeline.predictor import Predictor
from service.pipeline.transforms import preprocess_batch
from service.settings import ModelConfig, load_model_config
from service.types import DetectOptions, DetectResult, EncodedImage


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_checkpoint(folder / "weights.pth", build_detector("rtmdet-ins-tiny", 2).state_dict(), ["a", "b"])
    (folder / "model.toml").write_text('backend = "eager"\narch = "rtmdet-ins-tiny"\nweights = "weights.pth"\ninput_size = 64\n')
    return folder


def test_eager_backend_outputs_and_channels_last(model_folder):
    cfg = load_model_config(model_folder)
    backend = create_backend(cfg, "cpu")
    assert isinstance(backend, Backend) and backend.name == "eager"
    backend.load()
    images = [np.random.default_rng(i).integers(0, 256, (50, 80, 3), dtype=np.uint8) for i in range(2)]
    batch, _ = preprocess_batch(images, 64)
    raw = backend.infer(batch)
    assert isinstance(raw, tuple)  # backends return raw tensors; the family names them
    out = HeadOutputs.from_flat(raw)
    assert [t.shape for t in out.cls_scores] == [(2, 2, 8, 8), (2, 2, 4, 4), (2, 2, 2, 2)]
    assert [t.shape for t in out.bbox_preds] == [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)]
    assert [t.shape for t in out.kernel_preds] == [(2, 169, 8, 8), (2, 169, 4, 4), (2, 169, 2, 2)]
    assert out.mask_feat.shape == (2, 8, 8, 8)
    assert all(t.dtype == torch.float32 for t in out.flat())

    cl_cfg = load_model_config(model_folder, eager={"channels_last": True, "fp16": True})
    cl_backend = create_backend(cl_cfg, "cpu")
    assert not cl_backend.fp16  # fp16 is CUDA only
    cl_backend.load()
    for a, b in zip(out.flat(), cl_backend.infer(batch)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    backend.close()
    cl_backend.close()


def test_eager_backend_rejects_weights_of_another_arch(model_folder):
    cfg = load_model_config(model_folder, arch="rtmdet-tiny")
    with pytest.raises(ConfigError):
        create_backend(cfg, "cpu").load()


@pytest.mark.skipif(importlib.util.find_spec("service.backends.onnxrt") is not None, reason="onnxrt backend exists")
def test_onnxruntime_backend_missing_is_a_config_error(model_folder):
    with pytest.raises(ConfigError, match="onnxruntime"):
        create_backend(load_model_config(model_folder, backend="onnxruntime"), "cpu")


class End2EndBackend:
    """A foreign backend whose graph already ran decode + NMS (MMDeploy layout), at input size 64."""

    name = "fake-end2end"
    device = "cpu"

    def __init__(self, batch_override: int | None = None):
        self.batch_override = batch_override

    def load(self) -> None:
        pass

    def infer(self, batch: torch.Tensor) -> InputDetections:
        n = self.batch_override or batch.shape[0]
        dets = torch.zeros(n, 3, 5)
        dets[:, 0] = torch.tensor([8.0, 8.0, 40.0, 24.0, 0.9])
        dets[:, 1] = torch.tensor([0.0, 0.0, 10.0, 10.0, 0.2])
        labels = torch.tensor([[1, 0, -1]] * n)
        masks = torch.zeros(n, 3, 64, 64)
        masks[:, 0, 8:24, 8:40] = 0.8
        return InputDetections(dets, labels, masks)

    def close(self) -> None:
        pass


def _predictor(backend) -> Predictor:
    cfg = ModelConfig(name="e2e", arch="rtmdet-ins-tiny", input_size=64, default_score_thr=0.5)
    return Predictor(cfg, backend=backend, detector=get_detector(cfg.arch), classes=("a", "b"), device="cpu",
                     version="e2e-1")


def _png(h: int, w: int) -> EncodedImage:
    return EncodedImage(cv2.imencode(".png", np.zeros((h, w, 3), np.uint8))[1].tobytes())


def test_end2end_backend_plugs_into_the_predictor():
    predictor = _predictor(End2EndBackend())
    result, bad = predictor.predict([_png(128, 64), EncodedImage(b"\x89PNG\r\n\x1a\n")], [DetectOptions()] * 2)
    assert isinstance(bad, InvalidImage)
    assert isinstance(result, DetectResult) and (result.image_height, result.image_width) == (128, 64)
    # input 64 holds the 128x64 image at half size: boxes double; the 0.2 one falls below 0.5
    (det,) = result.detections
    assert (det.class_name, det.box_xyxy) == ("b", (16.0, 16.0, 64.0, 48.0))
    assert det.score == pytest.approx(0.9)
    decoded = mask_utils.decode({"size": [128, 64], "counts": det.mask.counts.encode()})
    assert decoded.shape == (128, 64)
    assert decoded[20:44, 20:60].all() and not decoded[60:].any()


def test_backend_returning_the_wrong_batch_size_fails_every_image_loudly():
    predictor = _predictor(End2EndBackend(batch_override=1))
    results = predictor.predict([_png(64, 64), _png(32, 32)], [DetectOptions()] * 2)
    assert all(isinstance(r, InternalError) for r in results)
    assert "returned 1 results for a batch of 2" in results[0].message
