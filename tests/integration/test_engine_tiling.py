"""Tiled requests through Engine.detect with the bundled rtmdet on generated small-shape images."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from fakes import running_engine, sample, write_model
from service import errors
from service.demo.dataset import CLASSES, render_small_shapes
from service.pipeline.tiling import tile_layout
from service.types import DetectOptions, EncodedImage, RawImage, TileMerge

pytestmark = pytest.mark.integration

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "rtmdet"
WIDTH, HEIGHT, TILE = 960, 704, 320


def run(coro, timeout_s: float = 300.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def bundled_rtmdet(store: Path, *, batch: dict | None = None, tiling: str = "") -> None:
    folder = store / "shapes"
    folder.mkdir(parents=True)
    toml = (f'arch = "rtmdet-tiny"\nweights = "{BUNDLED / "weights.pth"}"\nclasses = {list(CLASSES)!r}\n'
            'input_size = 320\nbackend = "eager"\ndefault_score_thr = 0.3\n[workers]\ncount = 1\n')
    toml = toml.replace("'", '"')
    if batch:
        toml += "[batch]\n" + "".join(f"{k} = {v}\n" for k, v in batch.items())
    (folder / "model.toml").write_text(toml + tiling)


@pytest.fixture(scope="module")
def scene():
    image, anns = render_small_shapes(np.random.default_rng(5), WIDTH, HEIGHT, num_shapes=24)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return jpeg.tobytes(), anns


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _gt_box(ann) -> tuple[float, float, float, float]:
    x, y, w, h = ann["bbox"]
    return (x, y, x + w, y + h)


def _cut_by_a_tile_edge(box) -> bool:
    edges_x = {e for w in tile_layout(WIDTH, HEIGHT, TILE, 0.2) for e in (w.x0, w.x1)} - {0, WIDTH}
    edges_y = {e for w in tile_layout(WIDTH, HEIGHT, TILE, 0.2) for e in (w.y0, w.y1)} - {0, HEIGHT}
    return any(box[0] < e < box[2] for e in edges_x) or any(box[1] < e < box[3] for e in edges_y)


def test_tiles_batch_together_find_the_small_shapes_and_report_cut_ones_once(tmp_path, scene):
    jpeg, anns = scene
    bundled_rtmdet(tmp_path, batch={"max_batch_size": 8})
    items = len(tile_layout(WIDTH, HEIGHT, TILE, 0.2)) + 1  # 12 tiles + the full pass

    async def scenario():
        async with running_engine(tmp_path, inline=True, factory=None) as engine:
            labels = {"model": "shapes"}
            batches, sizes = sample("detserve_batch_size_count", labels), sample("detserve_batch_size_sum", labels)
            (tiled,) = await engine.detect("shapes", [EncodedImage(jpeg)], DetectOptions(tile=TILE))
            assert sample("detserve_batch_size_sum", labels) - sizes == items
            assert sample("detserve_batch_size_count", labels) - batches == -(-items // 8)  # full batches only
            (whole,) = await engine.detect("shapes", [EncodedImage(jpeg)], DetectOptions(tile="off"))
            (nmm,) = await engine.detect("shapes", [EncodedImage(jpeg)],
                                         DetectOptions(tile=TILE, tile_merge=TileMerge.NMM))
            (agnostic,) = await engine.detect("shapes", [EncodedImage(jpeg)],
                                              DetectOptions(tile=TILE, class_agnostic=True))
            return tiled, whole, nmm, agnostic

    tiled, whole, nmm, agnostic = run(scenario())
    assert (tiled.image_width, tiled.image_height) == (WIDTH, HEIGHT)

    def found(result):
        return [a for a in anns if any(d.label == a["category_id"] - 1 and _iou(d.box_xyxy, _gt_box(a)) >= 0.5
                                       for d in result.detections)]

    assert len(found(tiled)) >= 0.9 * len(anns) and len(found(nmm)) >= 0.9 * len(anns)
    assert len(found(whole)) < len(found(tiled))
    cut = [a for a in anns if _cut_by_a_tile_edge(_gt_box(a))]
    assert len(cut) >= 3  # the scene does exercise tile borders
    # Class-wise merges report a cut shape once in its class (another class's box around it is the
    # model's confusion, which the class-agnostic merge also removes).
    for result, any_class in ((tiled, False), (nmm, False), (agnostic, True)):
        for ann in cut:
            gt = _gt_box(ann)
            near = [d for d in result.detections if _iou(d.box_xyxy, gt) > 0.1
                    and (any_class or d.label == ann["category_id"] - 1)]
            assert len(near) == 1, f"shape at {gt} reported {len(near)} times: {near}"
            assert max(abs(p - g) for p, g in zip(near[0].box_xyxy, gt)) <= 2.0, (near[0].box_xyxy, gt)


def test_requests_whose_tiles_can_never_fit_are_413_not_429(tmp_path):
    write_model(tmp_path, "small-queue", batch={"max_queue_size": 8})
    write_model(tmp_path, "few-tiles", extra="[tiling]\nmode = 64\nmax_tiles = 4")

    async def scenario():
        async with running_engine(tmp_path, inline=True) as engine:
            big = RawImage(b"\0" * (300 * 200 * 3), 200, 300)
            with pytest.raises(errors.PayloadTooLarge, match="max_queue_size"):
                await engine.detect("small-queue", [big], DetectOptions(tile=64))  # 4 x 3 tiles + 1
            with pytest.raises(errors.PayloadTooLarge, match="max_tiles"):
                await engine.detect("few-tiles", [big])  # the model's own [tiling] default
            with pytest.raises(errors.InvalidRequest, match="render"):
                await engine.detect("few-tiles", [big], DetectOptions(render="png", tile=200))
            with pytest.raises(errors.InvalidRequest, match="tile"):
                await engine.detect("small-queue", [big], DetectOptions(tile="huge"))

    run(scenario())


MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, cv2, numpy as np
    from service.demo.dataset import render_small_shapes
    from service.pipeline.predictor import Predictor
    from service.pipeline.tiling import TileImage, TileWindow, predict_tiled
    from service.settings import load_model_config
    from service.types import DetectOptions, EncodedImage

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    image, anns = render_small_shapes(np.random.default_rng(1), 4000, 3000, num_shapes=100)
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    del image
    predictor = Predictor.from_config(load_model_config(sys.argv[1], backend="eager"), threads=2)
    warm = EncodedImage(cv2.imencode(".jpg", np.zeros((320, 320, 3), np.uint8))[1].tobytes())
    predictor.predict([warm] * 8, [DetectOptions()] * 8)  # the allocator's steady state for a batch
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = rss("VmRSS:")
    (result,) = predict_tiled(predictor, [EncodedImage(data)], DetectOptions(tile=320, max_dets=100))
    extra = rss("VmHWM:") - before
    print(extra, len(result.detections), sum(d.mask is not None for d in result.detections), len(anns))
    """
)


@pytest.mark.slow  # ~190 tiles of RTMDet-Ins on CPU: a minute or more on a busy 2-core box
def test_a_tiled_4000x3000_rtmdet_ins_request_with_100_instances_stays_under_300_mb_extra():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak RSS cannot be reset here")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(root / "models" / "rtmdet-ins")], cwd=root,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra, detections, with_masks, shapes = (int(v) for v in proc.stdout.split()[-4:])
    print(f"tiled 4000x3000 RTMDet-Ins: {detections} detections, extra peak RSS {extra / 2**20:.0f} MiB")
    assert shapes == 100 and detections >= 90 and with_masks == detections
    assert extra < 300 * 1024 * 1024, f"extra peak {extra / 2**20:.0f} MiB"


def test_tiles_cross_the_process_boundary_and_merge_into_one_result(tmp_path, scene):
    jpeg, _ = scene
    write_model(tmp_path, "null-tiles", arch="null", batch={"max_batch_size": 4})

    async def scenario():
        async with running_engine(tmp_path, inline=False, factory=None) as engine:
            labels = {"model": "null-tiles"}
            before = sample("detserve_batch_size_sum", labels)
            (result,) = await engine.detect("null-tiles", [EncodedImage(jpeg)], DetectOptions(tile=TILE))
            assert sample("detserve_batch_size_sum", labels) - before == len(tile_layout(WIDTH, HEIGHT, TILE, 0.2)) + 1
            return result

    result = run(scenario())
    assert (result.image_width, result.image_height) == (WIDTH, HEIGHT) and result.detections == []
