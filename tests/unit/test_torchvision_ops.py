"""service.pipeline.torchvision_ops gives torchvision's answers exactly, and a worker's whole path
(bundled rtmdet, ONNX Runtime and eager) runs without importing the torchvision package; what needs
the package (gradients, autocast, two-stage ONNX export) still gets it in a process that lacked it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision

from service.pipeline import torchvision_ops

ROOT = Path(__file__).resolve().parents[2]


def _boxes(n: int, seed: int, *, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = torch.rand(n, 2, generator=g) * 60 + 1
    scores = torch.rand(n, generator=g)
    if ties:  # repeated scores: the tie order must be torchvision's too
        scores = (scores * 8).floor() / 8
    return torch.cat([xy, xy + wh], dim=1), scores


@pytest.mark.parametrize("n", [0, 1, 37, 999, 1001, 3000])  # 1001+ boxes: torchvision's per-class branch on CPU
@pytest.mark.parametrize("ties", [False, True])
def test_batched_nms_matches_torchvision(n, ties):
    boxes, scores = _boxes(n, seed=n, ties=ties)
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(1))
    for iou in (0.3, 0.65):
        expected = torchvision.ops.batched_nms(boxes, scores, labels, iou)
        got = torchvision_ops.batched_nms(boxes, scores, labels, iou)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected)
        assert torch.equal(torchvision_ops.nms(boxes, scores, iou), torchvision.ops.nms(boxes, scores, iou))


def test_batched_nms_keeps_overlapping_boxes_of_different_classes():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision_ops.batched_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5).tolist() == [0, 2]
    assert torchvision_ops.nms(boxes, scores, 0.5).tolist() == [0]


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 0), (False, 2)])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(3)
    features = torch.rand(2, 8, 25, 38, generator=g)
    boxes, _ = _boxes(12, seed=4)
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).float(), boxes], dim=1)
    expected = torchvision.ops.roi_align(features, rois, (7, 7), spatial_scale=1 / 8,
                                         sampling_ratio=sampling_ratio, aligned=aligned)
    got = torchvision_ops.roi_align(features, rois, (7, 7), 1 / 8, sampling_ratio, aligned)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        torchvision_ops.roi_align(features, boxes, (7, 7), 1 / 8, 0, True)


_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import service.engine.worker  # what a worker process imports before its predictor
    from service.bench.corpus import generated_corpus
    from service.bench.setup import model_variant
    from service.pipeline.predictor import Predictor
    from service.settings import load_model_config
    from service.types import DetectOptions, EncodedImage

    store, backend = Path(sys.argv[1]), sys.argv[2]
    folder = model_variant(Path("models/rtmdet"), store, f"rtmdet-{backend}", backend=backend)
    predictor = Predictor.from_config(load_model_config(folder), device="cpu", threads=1)
    images = [EncodedImage(data) for data in generated_corpus(2, seed=5)]
    results = predictor.predict(images, [DetectOptions()] * len(images))
    predictor.close()
    dets = [[(d.label, round(d.score, 5), [round(v, 3) for v in d.box_xyxy]) for d in r.detections] for r in results]
    heavy = sorted(m for m in ("torchvision", "torch._dynamo", "torch.onnx", "sympy") if m in sys.modules)
    print(json.dumps({"backend": predictor.backend_name, "heavy": heavy, "detections": dets}))
""")


def _run_worker_path(store: Path, backend: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _WORKER, str(store), backend], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_worker_serves_without_importing_torchvision(tmp_path):
    # The first auto load may export (export imports torchvision); the second reuses the cache as a
    # restarted worker does, and must not.
    first = _run_worker_path(tmp_path, "auto")
    again = _run_worker_path(tmp_path, "auto")
    assert again["backend"] == "onnxruntime"
    assert again["heavy"] == []
    assert again["detections"] == first["detections"]
    assert sum(len(d) for d in again["detections"]) > 0
    eager = _run_worker_path(tmp_path, "eager")
    assert eager["backend"] == "eager"
    assert eager["heavy"] == []
    assert [[d[0] for d in image] for image in eager["detections"]] == [[d[0] for d in image]
                                                                         for image in first["detections"]]


_WITHOUT_PACKAGE = textwrap.dedent("""
    import sys, tempfile
    import torch
    from service.pipeline import torchvision_ops

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision_ops.nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert "torchvision" not in sys.modules
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the package's autocast rule upcasts
        assert torchvision_ops.nms(boxes.bfloat16(), scores.bfloat16(), 0.5).tolist() == [0, 2]
    features = torch.rand(1, 4, 16, 16, requires_grad=True)
    rois = torch.tensor([[0.0, 1, 1, 9, 9]])
    torchvision_ops.roi_align(features, rois, (2, 2), 1.0, 0, True).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0

    del sys.modules["torchvision"]  # as if never imported: export must import it before its trace
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]
    from service.detectors.registry import build_detector
    from service.detectors.two_stage.onnx_export import export_two_stage
    with tempfile.TemporaryDirectory() as folder:
        files = export_two_stage(build_detector("faster-rcnn-r50-fpn", 3), folder)
        assert files.features.stat().st_size > 0 and files.bbox.stat().st_size > 0
    print("ok")
""")


def test_gradients_autocast_and_two_stage_export_get_the_package_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_PACKAGE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
