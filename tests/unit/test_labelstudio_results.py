"""DetectResult -> Label Studio regions: percent boxes, polygons from masks, both RLE formats."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.pipeline.polygons import decode_mask, mask_polygons
from service.protocols.labelstudio.brush import brush_rle_to_mask, decode_rle, encode_rle, mask_to_brush_rle
from service.protocols.labelstudio.config import bind_controls, parse_label_config
from service.protocols.labelstudio.results import task_prediction
from service.types import Detection, DetectResult, RLEMask

ROOT = Path(__file__).resolve().parents[2]
LS_PYTHON = Path(os.environ.get("DETSERVE_LABELSTUDIO_VENV", ROOT / ".venv-labelstudio")) / "bin" / "python"

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="Circle"/><Label value="Square"/></RectangleLabels>
<PolygonLabels name="poly" toName="image"><Label value="Circle"/></PolygonLabels>
<BrushLabels name="brush" toName="image" model_score_threshold="0.8"><Label value="Circle"/></BrushLabels>
</View>"""


def coco_rle(mask: np.ndarray) -> RLEMask:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return RLEMask(height=mask.shape[0], width=mask.shape[1], counts=enc["counts"].decode())


def disk(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8)


def controls(has_masks=True):
    return bind_controls(parse_label_config(CONFIG), model="m", classes=("circle", "square", "star"),
                         has_masks=has_masks, default_score_thr=0.3)


def result_with(dets, w=200, h=100):
    return DetectResult(detections=dets, image_width=w, image_height=h, model_name="m", model_version="m-abc")


def test_rectangles_in_percent_of_original_image_and_clamped():
    dets = [
        Detection(label=1, class_name="square", score=0.9, box_xyxy=(20.0, 10.0, 120.0, 60.0)),
        Detection(label=0, class_name="circle", score=0.5, box_xyxy=(-5.0, 90.0, 210.0, 130.0)),
        Detection(label=2, class_name="star", score=0.99, box_xyxy=(0, 0, 10, 10)),  # no label: dropped
        Detection(label=1, class_name="square", score=0.1, box_xyxy=(0, 0, 10, 10)),  # under threshold
    ]
    pred = task_prediction(result_with(dets), controls(has_masks=False)[:1], "m-abc")
    assert pred["model_version"] == "m-abc"
    assert pred["score"] == pytest.approx(0.7)
    first, second = pred["result"]
    assert first["type"] == "rectanglelabels" and (first["from_name"], first["to_name"]) == ("box", "image")
    assert (first["original_width"], first["original_height"], first["image_rotation"]) == (200, 100, 0)
    assert first["score"] == 0.9
    assert first["value"] == {"x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0, "rotation": 0,
                              "rectanglelabels": ["Square"]}
    v = second["value"]
    assert (v["x"], v["y"], v["width"], v["height"]) == (0.0, 90.0, 100.0, 10.0)
    assert v["rectanglelabels"] == ["Circle"]


def test_percent_boxes_convert_back_to_pixels():
    box = (13.3, 7.7, 151.9, 88.2)
    pred = task_prediction(result_with([Detection(0, "circle", 0.9, box)], w=641, h=479), controls()[:1], "v")
    v = pred["result"][0]["value"]
    back = (v["x"] * 641 / 100, v["y"] * 479 / 100, (v["x"] + v["width"]) * 641 / 100, (v["y"] + v["height"]) * 479 / 100)
    assert back == pytest.approx(box)


def test_empty_or_missing_result_is_an_empty_prediction():
    assert task_prediction(None, controls(), "v") == {"result": [], "score": 0.0, "model_version": "v"}
    assert task_prediction(result_with([]), controls(), "v")["result"] == []


def test_polygons_follow_the_mask_and_brush_uses_ls_rle():
    h, w = 100, 200
    mask = disk(h, w, 60, 40, 25)
    det = Detection(0, "circle", 0.9, (35.0, 15.0, 86.0, 66.0), mask=coco_rle(mask))
    pred = task_prediction(result_with([det], w, h), controls(), "v")
    kinds = [r["type"] for r in pred["result"]]
    assert kinds == ["rectanglelabels", "polygonlabels", "brushlabels"]
    poly = pred["result"][1]["value"]
    assert poly["closed"] is True and poly["polygonlabels"] == ["Circle"]
    pts = np.array(poly["points"]) * [w / 100, h / 100]
    import cv2

    drawn = np.zeros((h, w), np.uint8)
    cv2.fillPoly(drawn, [np.round(pts - 0.5).astype(np.int32)], 1)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou > 0.95
    brush = pred["result"][2]
    assert brush["value"]["format"] == "rle" and brush["value"]["brushlabels"] == ["Circle"]
    assert (brush["original_width"], brush["original_height"]) == (w, h)
    assert np.array_equal(brush_rle_to_mask(brush["value"]["rle"], h, w), mask * 255)


def test_brush_tag_threshold_applies_per_tag():
    mask = disk(100, 200, 60, 40, 25)
    det = Detection(0, "circle", 0.5, (35.0, 15.0, 86.0, 66.0), mask=coco_rle(mask))
    kinds = [r["type"] for r in task_prediction(result_with([det]), controls(), "v")["result"]]
    assert kinds == ["rectanglelabels", "polygonlabels"]  # brush tag asks for 0.8


def test_two_blobs_give_two_polygons_biggest_first():
    mask = disk(80, 80, 20, 20, 6) | disk(80, 80, 55, 55, 15)
    polys = mask_polygons(mask)
    assert len(polys) == 2
    assert np.array(polys[0]).mean(axis=0) == pytest.approx([55.5, 55.5], abs=1.0)


def test_coco_rle_decodes_in_row_major_order():
    mask = np.zeros((30, 50), np.uint8)
    mask[5:10, 20:45] = 1
    assert np.array_equal(decode_mask(coco_rle(mask)), mask)


@pytest.mark.parametrize("n", [0, 1, 7, 9, 17, 300, 70_000, 200_000])
def test_ls_rle_round_trips_runs_of_every_width(n):
    values = np.concatenate([np.full(n, 255, np.uint8), np.arange(20, dtype=np.uint8), np.zeros(n, np.uint8)])
    assert np.array_equal(decode_rle(encode_rle(values)), values)


def test_ls_rle_is_not_coco_rle():
    mask = disk(40, 40, 20, 20, 10)
    ls = mask_to_brush_rle(mask)
    assert all(isinstance(b, int) and 0 <= b <= 255 for b in ls)
    assert int.from_bytes(bytes(ls[:4]), "big") == 40 * 40 * 4  # a 32-bit value count leads the stream
    assert ls != list(mask_utils.encode(np.asfortranarray(mask))["counts"])


@pytest.mark.skipif(not LS_PYTHON.exists(), reason="Label Studio venv (.venv-labelstudio) not installed")
def test_brush_rle_round_trips_through_label_studio_sdk(tmp_path):
    masks = {"disk": disk(120, 160, 70, 50, 33), "edges": np.zeros((64, 64), np.uint8), "full": np.ones((9, 300), np.uint8)}
    masks["edges"][0, :] = 1
    masks["edges"][:, -1] = 1
    payload = {k: {"rle": mask_to_brush_rle(m), "shape": m.shape, "mask": (m * 255).ravel().tolist()} for k, m in masks.items()}
    (tmp_path / "in.json").write_text(json.dumps(payload))
    script = """
import json, sys, numpy as np
from label_studio_sdk.converter import brush
data = json.load(open(sys.argv[1]))
for name, item in data.items():
    h, w = item["shape"]
    image = brush.decode_rle(item["rle"]).reshape(h, w, 4)
    want = np.array(item["mask"], np.uint8).reshape(h, w)
    assert all((image[:, :, c] == want).all() for c in range(4)), name
    item["sdk_rle"] = brush.mask2rle(want)
print(json.dumps(data))
"""
    proc = subprocess.run([str(LS_PYTHON), "-c", script, str(tmp_path / "in.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name, item in json.loads(proc.stdout).items():  # and the SDK's own encoding decodes here
        h, w = item["shape"]
        assert np.array_equal(brush_rle_to_mask(item["sdk_rle"], h, w).ravel(), np.array(item["mask"])), name


@pytest.mark.parametrize("seed", range(8))
def test_brush_rle_from_the_box_window_is_the_full_frame_encoding_byte_for_byte(seed):
    from service.pipeline.polygons import box_window
    from service.protocols.labelstudio.brush import encode_runs, window_brush_runs

    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(1, 50)), int(rng.integers(1, 50))
    mask = (rng.random((height, width)) < rng.uniform(0.0, 1.0)).astype(np.uint8)
    if seed == 0:
        mask[:] = 1  # one run over every row: rows joined at the frame edge
    if seed == 1:
        mask[:] = 0
    rle = coco_rle(mask)
    found = box_window(rle)
    window, x0, y0 = found if found is not None else (np.zeros((0, 0), np.uint8), 0, 0)
    assert encode_runs(*window_brush_runs(window, x0, y0, width, height)) == mask_to_brush_rle(mask)


def test_each_mask_is_encoded_once_however_many_controls_ask_for_it(monkeypatch):
    from service.protocols.labelstudio import results

    calls = []
    real = results.encode_runs
    monkeypatch.setattr(results, "encode_runs", lambda *a: calls.append(1) or real(*a))
    brushes = "".join(f'<BrushLabels name="b{i}" toName="image"><Label value="Circle"/></BrushLabels>' for i in range(5))
    config = f'<View><Image name="image" value="$image"/>{brushes}</View>'
    bound = bind_controls(parse_label_config(config), model="m", classes=("circle",), has_masks=True,
                          default_score_thr=0.3)
    dets = [Detection(0, "circle", 0.9, (0, 0, 1, 1), mask=coco_rle(disk(100, 200, 40 + 50 * k, 50, 20)))
            for k in range(3)]
    regions = task_prediction(result_with(dets), bound, "v")["result"]
    assert len(regions) == 15 and len(calls) == 3
    for k, region in enumerate(regions[:3]):
        assert np.array_equal(brush_rle_to_mask(region["value"]["rle"], 100, 200) > 0, disk(100, 200, 40 + 50 * k, 50, 20) > 0)


def test_an_answer_over_its_byte_budget_stops_being_built():
    from service.errors import PayloadTooLarge
    from service.protocols.labelstudio.results import AnswerBudget

    dets = [Detection(0, "circle", 0.9, (10, 10, 60, 60), mask=coco_rle(disk(100, 200, 35, 35, 25)))] * 50
    full = task_prediction(result_with(dets), controls(), "v")["result"]
    budget = AnswerBudget(len(json.dumps(full)) // 4)
    with pytest.raises(PayloadTooLarge, match="max_answer_bytes"):
        task_prediction(result_with(dets), controls(), "v", budget)
    assert budget.used <= budget.max_bytes + 2 * max(len(json.dumps(r)) for r in full)  # stopped at the first region over
    # the estimate is not below the JSON actually sent (so the bound holds)
    roomy = AnswerBudget(1 << 30)
    task_prediction(result_with(dets), controls(), "v", roomy)
    assert roomy.used >= len(json.dumps(full))


def test_long_names_from_the_labelling_config_are_charged_for_every_region():
    from service.errors import PayloadTooLarge
    from service.protocols.labelstudio.results import AnswerBudget

    name = "n" * 50_000
    config = CONFIG.replace('name="box"', f'name="{name}"')
    bound = bind_controls(parse_label_config(config), model="m", classes=("circle", "square", "star"),
                          has_masks=False, default_score_thr=0.3)[:1]
    dets = [Detection(1, "square", 0.9, (20.0, 10.0, 120.0, 60.0))] * 20
    sent = len(json.dumps(task_prediction(result_with(dets), bound, "v")["result"]))
    assert sent > 1_000_000
    with pytest.raises(PayloadTooLarge):
        task_prediction(result_with(dets), bound, "v", AnswerBudget(sent // 2))
    roomy = AnswerBudget(1 << 30)
    task_prediction(result_with(dets), bound, "v", roomy)
    assert sent <= roomy.used <= 1.2 * sent


def test_a_mask_of_millions_of_runs_is_refused_before_its_brush_is_built(monkeypatch):
    from service.errors import PayloadTooLarge
    from service.protocols.labelstudio import results
    from service.protocols.labelstudio.results import AnswerBudget

    encoded = []
    real = results.encode_runs
    monkeypatch.setattr(results, "encode_runs", lambda *a: encoded.append(1) or real(*a))
    speckle = (np.random.default_rng(0).random((600, 800)) < 0.5).astype(np.uint8)  # ~240k runs
    det = Detection(0, "circle", 0.9, (0, 0, 800, 600), mask=coco_rle(speckle))
    brush_only = [c for c in controls() if c.tag.kind.value == "brushlabels"]
    with pytest.raises(PayloadTooLarge):
        task_prediction(result_with([det], w=800, h=600), brush_only, "v", AnswerBudget(1 << 20))
    assert encoded == []  # refused from the run count, before the RLE was encoded


def test_the_deadline_is_checked_before_each_masks_work():
    from service.errors import DeadlineExceeded
    from service.protocols.labelstudio.results import AnswerBudget

    specks = np.zeros((100, 200), np.uint8)
    specks[::4, ::4] = 1  # single pixels: an outline with no polygon, so no region is ever charged
    det = Detection(0, "circle", 0.9, (0, 0, 200, 100), mask=coco_rle(specks))
    poly_only = [c for c in controls() if c.tag.kind.value == "polygonlabels"]
    assert task_prediction(result_with([det]), poly_only, "v")["result"] == []
    late = AnswerBudget(1 << 30, deadline=time.monotonic() - 1, deadline_s=95)
    with pytest.raises(DeadlineExceeded, match="95 s deadline"):
        task_prediction(result_with([det]), poly_only, "v", late)
