"""The engine with the real Predictor in spawned workers: the null arch and a tiny random-weight RTMDet."""
from __future__ import annotations

import asyncio
import io

import pytest

from fakes import running_engine, sample, write_model
from service import errors
from service.types import EncodedImage, RawImage

pytestmark = pytest.mark.integration

CLASSES = ["a", "b"]


def run(coro, timeout_s: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_null_arch_serves_through_worker_processes(tmp_path):
    write_model(tmp_path, "null-proc", arch="null", workers=1)

    async def scenario():
        async with running_engine(tmp_path, inline=False, factory=None) as engine:
            assert engine.ready()
            info = engine.model_info("null-proc")
            assert info.version == "null-proc" and info.backend == "null" and info.classes == tuple(CLASSES)
            assert {w.device for w in info.workers} == {"cpu"}
            payload = EncodedImage(b"\xff\xd8 not even decoded by the null arch")
            results = await asyncio.gather(*(engine.detect("null-proc", [payload]) for _ in range(32)))
            assert all(r[0].detections == [] for r in results)
            assert sample("detserve_batch_size_count", {"model": "null-proc"}) >= 1

    run(scenario())


@pytest.mark.slow  # builds and runs a real detector in a spawned worker: ~10 s idle, a minute on a busy box
def test_tiny_rtmdet_with_random_weights_in_a_worker_process(tmp_path):
    torch = pytest.importorskip("torch")
    from service.detectors.checkpoint import save_checkpoint
    from service.detectors.registry import build_detector

    folder = write_model(tmp_path, "tiny-proc", arch="rtmdet-tiny", workers=1,
                         extra='weights = "weights.pth"\ndefault_score_thr = 0.0', batch={"max_batch_size": 4})
    torch.manual_seed(0)
    save_checkpoint(folder / "weights.pth", build_detector("rtmdet-tiny", len(CLASSES)).state_dict(), CLASSES)

    async def scenario():
        async with running_engine(tmp_path, inline=False, factory=None) as engine:
            info = engine.model_info("tiny-proc")
            assert info.version.startswith("tiny-proc-") and info.arch == "rtmdet-tiny" and not info.has_masks
            images = [EncodedImage(jpeg(96, 64, seed=i)) for i in range(4)]
            results = await asyncio.gather(*(engine.detect("tiny-proc", [img]) for img in images))
            assert [(r[0].image_width, r[0].image_height) for r in results] == [(96, 64)] * 4
            raw = RawImage(bytes(32 * 48 * 3), height=32, width=48)
            (result,) = await engine.detect("tiny-proc", [raw])
            assert (result.image_width, result.image_height) == (48, 32)
            for d in result.detections:
                x1, y1, x2, y2 = d.box_xyxy
                assert 0 <= x1 <= x2 <= 48 and 0 <= y1 <= y2 <= 32 and d.class_name in CLASSES
            with pytest.raises(errors.InvalidImage):
                await engine.detect("tiny-proc", [EncodedImage(jpeg(64, 64)[:200])])  # truncated JPEG
            with pytest.raises(errors.InvalidRequest):
                await engine.detect("tiny-proc", [EncodedImage(b"plain text, not an image")])
            assert engine.model_ready("tiny-proc")
            assert engine.model_info("tiny-proc").workers[0].restarts == 0  # bad input never kills a worker
            assert sample("detserve_stage_latency_seconds_count", {"model": "tiny-proc", "stage": "inference"}) >= 5

    run(scenario())


@pytest.mark.slow  # the bundled rtmdet-ins in a spawned worker
def test_request_knobs_cross_the_process_boundary(tmp_path):
    """iou_thr, class_agnostic and mask_format ride DetectOptions to the worker; polygons ride back."""
    import os
    from pathlib import Path

    from service.pipeline.predictor import Predictor
    from service.settings import load_model_config
    from service.types import DetectOptions, MaskFormat

    bundled = Path(__file__).resolve().parents[2] / "models" / "rtmdet-ins"
    folder = tmp_path / "ins"
    folder.mkdir()
    os.symlink(bundled / "weights.pth", folder / "weights.pth")
    (folder / "model.toml").write_text('backend = "eager"\ndevice = "cpu"\n' + (bundled / "model.toml").read_text()
                                       .replace('name = "rtmdet-ins"', 'name = "ins"') + "\n[workers]\nthreads = 1\n")
    image = EncodedImage((bundled / "demo.jpg").read_bytes())
    options = [DetectOptions(score_thr=0.05, iou_thr=0.3, class_agnostic=True, mask_format=MaskFormat.POLYGON),
               DetectOptions(mask_format=MaskFormat.NONE)]

    async def scenario():
        async with running_engine(tmp_path, inline=False, factory=None) as engine:
            return [(await engine.detect("ins", [image], opts))[0] for opts in options]

    served = run(scenario())
    predictor = Predictor.from_config(load_model_config(folder), threads=1)
    try:
        local = [predictor.predict([image], [opts])[0] for opts in options]
    finally:
        predictor.close()
    for got, want in zip(served, local):
        assert [(d.label, d.polygons is None, d.mask is None) for d in got.detections] == \
               [(d.label, d.polygons is None, d.mask is None) for d in want.detections]
        assert [d.polygons for d in got.detections] == [d.polygons for d in want.detections]
    assert served[0].detections and all(d.polygons for d in served[0].detections)
