"""Acceptance: a real Label Studio 1.23.2 pre-annotates generated shape images through detserve.

Label Studio lives in its own virtualenv (.venv-labelstudio, installed here when absent: it pins
its own Django and label-studio-sdk). It runs on loopback with SQLite; `detserve serve` runs the
bundled models; a driver script in Label Studio's venv uses label-studio-sdk to create projects,
upload images, connect the backend (with Basic auth) and press "Retrieve Predictions".

With the trained bundled models the regions must match the generated ground truth (IoU >= 0.7).
Without them, random-weight models stand in and the regions must equal detserve's own
/predictions output, converted back from percent.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.bench.labelstudio import LEGACY_TOKEN, LabelStudio
from service.demo.dataset import CLASSES, make_dataset
from service.protocols.labelstudio.brush import brush_rle_to_mask
from service.settings import discover_models, load_model_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
BASIC = ("labelstudio", "s3cret-pass")
DETSERVE = str(Path(sys.executable).with_name("detserve"))
NUM_BOX_TASKS = int(os.environ.get("DETSERVE_LS_TASKS", "200"))
NUM_MASK_TASKS = 30
# The bundled tiny models on synthetic shapes (measured on this data: ~94% of boxes and ~86% of
# masks at IoU >= 0.7). Precision is printed, not asserted: the stage-1 models emit same-place
# duplicates of other classes, a model matter. The conversion is checked exactly against /predictions.
MIN_RECALL = 0.9
MIN_MASK_RECALL = 0.8
# Capitalised labels exercise the case-insensitive match, "Hexa" the predicted_values mapping,
# and the missing "star" label the dropping of unmapped classes.
LABELS = ['<Label value="Circle"/>', '<Label value="SQUARE"/>', '<Label value="triangle"/>',
          '<Label value="Hexa" predicted_values="hexagon"/>']
LABEL_OF = {"circle": "Circle", "square": "SQUARE", "triangle": "triangle", "hexagon": "Hexa"}
RECT_CONFIG = f"""<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">{''.join(LABELS)}</RectangleLabels></View>"""
MASK_CONFIG = f"""<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image">{''.join(LABELS)}</PolygonLabels>
<BrushLabels name="brush" toName="image">{''.join(LABELS)}</BrushLabels></View>"""

DRIVER = r'''
import json, sys, time
import requests
from label_studio_sdk import LabelStudio

spec = json.load(open(sys.argv[1]))
url, token = spec["url"], spec["token"]
ls = LabelStudio(base_url=url, api_key=token, timeout=600)
out = {}
project = ls.projects.create(title=spec["title"], label_config=spec["label_config"])
out["project"] = project.id
files = spec["files"]
for start in range(0, len(files), 50):  # Django refuses more than 100 files per request
    handles = [(f"file{i}", (p.rsplit("/", 1)[-1], open(p, "rb"))) for i, p in enumerate(files[start:start + 50])]
    resp = requests.post(f"{url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {token}"},
                         files=handles, timeout=600)
    for _, (_, fh) in handles:
        fh.close()
    resp.raise_for_status()
try:
    ls.ml.create(project=project.id, url=spec["backend_url"], title="wrong password", auth_method="BASIC_AUTH",
                 basic_auth_user=spec["basic_auth"][0], basic_auth_pass="wrong")
    out["bad_auth_error"] = None
except Exception as exc:
    out["bad_auth_error"] = str(exc)
ml = ls.ml.create(project=project.id, url=spec["backend_url"], title="detserve", auth_method="BASIC_AUTH",
                  basic_auth_user=spec["basic_auth"][0], basic_auth_pass=spec["basic_auth"][1])
out["ml_state"] = ls.ml.get(id=ml.id).state
started = time.perf_counter()
ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
out["retrieve_s"] = time.perf_counter() - started
out["tasks"] = [{"id": t.id, "image": t.data["image"]} for t in ls.tasks.list(project=project.id)]
out["predictions"] = [{"task": p.task, "result": p.result, "score": p.score, "model_version": p.model_version}
                      for p in ls.predictions.list(project=project.id)]
json.dump(out, open(sys.argv[2], "w"))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: process exited early:\n{log.read_text(errors='replace')[-4000:]}"
        try:
            if httpx.get(url, timeout=3).status_code in ok:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not up in {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    with LabelStudio(tmp_path_factory.mktemp("label-studio")) as ls:
        yield {"url": ls.url, "python": ls.python, "pat": ls.pat, "log": ls.log}


def model_store(root: Path) -> tuple[Path, bool]:
    """The bundled models when their trained weights are present; else random-weight stand-ins."""
    bundled = REPO / "models"
    found = discover_models(bundled)
    if {"rtmdet", "rtmdet-ins"} <= found.keys() and all(fully_trained(found[n]) for n in ("rtmdet", "rtmdet-ins")):
        return bundled, True
    import torch

    from service.detectors.checkpoint import save_checkpoint
    from service.detectors.registry import build_detector

    torch.manual_seed(0)
    store = root / "store"
    for name, arch in (("rtmdet", "rtmdet-tiny"), ("rtmdet-ins", "rtmdet-ins-tiny")):
        folder = store / name
        folder.mkdir(parents=True)
        save_checkpoint(folder / "weights.pth", build_detector(arch, len(CLASSES)).state_dict(), CLASSES)
        # Untrained scores sit near the 0.01 prior: thresholds low enough that regions exist.
        (folder / "model.toml").write_text(
            f'backend = "eager"\narch = "{arch}"\nweights = "weights.pth"\nclasses = {json.dumps(list(CLASSES))}\ninput_size = 320\n'
            "device = \"cpu\"\ndefault_score_thr = 0.0\n[test_cfg]\nscore_thr = 0.0\nmax_per_img = 5\n"
        )
    return store, False


def fully_trained(folder: Path) -> bool:
    """The demo trainer records its run in the checkpoint meta; placeholders and checkpoints
    saved part-way through a run do not count."""
    from service.detectors.checkpoint import load_checkpoint

    cfg = load_model_config(folder)
    if not cfg.weights or not cfg.path(cfg.weights).is_file():
        return False
    meta = load_checkpoint(cfg.path(cfg.weights)).meta or {}
    meta = meta.get("source_meta", meta)  # a box model derived from the trained Ins model
    planned = (meta.get("train_config") or {}).get("iters")
    return bool(planned) and meta.get("steps", 0) >= planned


@pytest.fixture(scope="module")
def detserve(label_studio, tmp_path_factory):
    root = tmp_path_factory.mktemp("detserve")
    store, trained = model_store(root)
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LABEL_STUDIO_URL": label_studio["url"],
           "LABEL_STUDIO_API_KEY": label_studio["pat"], "BASIC_AUTH_USER": BASIC[0], "BASIC_AUTH_PASS": BASIC[1]}
    log = root / "detserve.log"
    config = root / "server.toml"
    config.write_text("heartbeat_timeout_s = 120.0\n")  # a shared, busy CPU must not look like a hung worker
    cmd = [DETSERVE, "serve", "--config", str(config), "--model-store", str(store), "--models", "rtmdet,rtmdet-ins", "--host", "127.0.0.1",
           "--no-grpc", "--inference-port", str(ports["inference"]), "--management-port", str(ports["management"]),
           "--metrics-port", str(ports["metrics"])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{ports['inference']}"
    try:
        wait_http(f"{url}/readyz", proc, log, timeout_s=300)
        yield {"url": url, "trained": trained, "log": log}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Generated images with exact ground truth: file stem -> (width, height, [(class, box, mask)])."""
    root = tmp_path_factory.mktemp("shapes")
    coco = json.loads(make_dataset(root, NUM_BOX_TASKS, seed=20261122, min_side=240, max_side=800).read_text())
    truth = {}
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        truth[Path(image["file_name"]).stem] = {
            "path": str(root / image["file_name"]), "width": image["width"], "height": image["height"],
            "objects": [(CLASSES[a["category_id"] - 1], xywh_to_xyxy(a["bbox"]), a["segmentation"]) for a in anns],
        }
    return truth


def xywh_to_xyxy(b):
    return (b[0], b[1], b[0] + b[2], b[1] + b[3])


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def region_box_px(region: dict) -> tuple[float, float, float, float]:
    v, w, h = region["value"], region["original_width"], region["original_height"]
    return (v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100)


def polygon_mask(region: dict) -> np.ndarray:
    w, h = region["original_width"], region["original_height"]
    points = np.array(region["value"]["points"]) * [w / 100, h / 100] - 0.5
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def run_driver(label_studio, detserve, tmp_path, title, config, files, model) -> dict:
    spec = {"url": label_studio["url"], "token": LEGACY_TOKEN, "title": title, "label_config": config,
            "files": files, "backend_url": f"{detserve['url']}/labelstudio/{model}", "basic_auth": list(BASIC)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([str(label_studio["python"]), str(tmp_path / "driver.py"), str(tmp_path / "spec.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (
        f"driver failed:\n{proc.stderr[-4000:]}\n--- detserve log:\n{detserve['log'].read_text()[-3000:]}"
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["ml_state"] == "CO"  # the connection validated
    assert "authentication" in (out["bad_auth_error"] or ""), out["bad_auth_error"]
    return out


def by_stem(out: dict, shapes: dict) -> list[tuple[dict, list[dict]]]:
    """(ground truth, that task's predictions) per task; uploads are named '<uuid8>-<file name>'."""
    preds: dict[int, list[dict]] = {}
    for p in out["predictions"]:
        preds.setdefault(p["task"], []).append(p)
    pairs = []
    for task in out["tasks"]:
        stem = re.sub(r"^[0-9a-f]{8}-", "", Path(task["image"]).stem)
        pairs.append((shapes[stem], preds.get(task["id"], [])))
    return pairs


def own_predictions(detserve, model: str, path: str) -> list[dict]:
    with open(path, "rb") as fh:
        resp = httpx.put(f"{detserve['url']}/predictions/{model}", content=fh.read(), timeout=60)
    resp.raise_for_status()
    return resp.json()


def matches(found: list[tuple[str, object]], truth: list[tuple[str, object]], score) -> tuple[int, int]:
    """(ground-truth objects with a same-label region at IoU >= 0.7, regions on a same-label
    object at IoU >= 0.5)."""
    recalled = sum(any(fl == tl and score(f, t) >= 0.7 for fl, f in found) for tl, t in truth)
    precise = sum(any(fl == tl and score(f, t) >= 0.5 for tl, t in truth) for fl, f in found)
    return recalled, precise


def test_rectangle_project_retrieve_predictions(label_studio, detserve, shapes, tmp_path):
    files = [gt["path"] for gt in shapes.values()]
    out = run_driver(label_studio, detserve, tmp_path, "detserve boxes", RECT_CONFIG, files, "rtmdet")
    print(f"\nRetrieve Predictions, {len(files)} tasks, rtmdet on CPU: {out['retrieve_s']:.1f} s")
    assert len(out["tasks"]) == len(files)
    version = httpx.post(f"{detserve['url']}/labelstudio/rtmdet/setup", json={}, auth=BASIC).json()["model_version"]
    recalled = precise = objects = regions_seen = 0
    for index, (gt, preds) in enumerate(by_stem(out, shapes)):
        assert len(preds) == 1 and preds[0]["model_version"] == version
        regions = preds[0]["result"]
        for r in regions:
            assert r["type"] == "rectanglelabels" and (r["from_name"], r["to_name"]) == ("label", "image")
            assert (r["original_width"], r["original_height"], r["image_rotation"]) == (gt["width"], gt["height"], 0)
            assert r["value"]["rectanglelabels"][0] in LABEL_OF.values()
            assert all(0 <= r["value"][k] <= 100 for k in ("x", "y", "width", "height"))
        if index < 10:  # the regions are detserve's own detections, converted to percent and back
            own = [d for d in own_predictions(detserve, "rtmdet", gt["path"]) if d["class_name"] in LABEL_OF]
            assert len(regions) == len(own)
            for r, d in zip(regions, own):
                assert r["value"]["rectanglelabels"] == [LABEL_OF[d["class_name"]]]
                assert region_box_px(r) == pytest.approx(d["bbox"], abs=0.02)
        found = [(r["value"]["rectanglelabels"][0], region_box_px(r)) for r in regions]
        truth = [(LABEL_OF[c], box) for c, box, _ in gt["objects"] if c in LABEL_OF]
        hits = matches(found, truth, box_iou)
        recalled, precise = recalled + hits[0], precise + hits[1]
        objects, regions_seen = objects + len(truth), regions_seen + len(found)
    print(f"boxes: {recalled}/{objects} shapes found at IoU >= 0.7, {precise}/{regions_seen} regions correct")
    if detserve["trained"]:
        assert recalled >= MIN_RECALL * objects
    # Label Studio drops the whole call at ML_TIMEOUT_PREDICT (100 s). About 12 s of it is model
    # CPU time (rtmdet-tiny at 320: ~60 ms per image on one core); the rest is Label Studio's own
    # work and, on a shared machine, waiting for a core.
    assert out["retrieve_s"] < 100, f"Retrieve Predictions took {out['retrieve_s']:.1f} s"


def test_mask_project_polygons_and_brush(label_studio, detserve, shapes, tmp_path):
    files = [gt["path"] for gt in list(shapes.values())[:NUM_MASK_TASKS]]
    out = run_driver(label_studio, detserve, tmp_path, "detserve masks", MASK_CONFIG, files, "rtmdet-ins")
    assert len(out["tasks"]) == len(files)
    totals = {"polygon": [0, 0, 0], "brush": [0, 0, 0]}  # recalled, precise, regions
    objects = 0
    for index, (gt, preds) in enumerate(by_stem(out, shapes)):
        assert len(preds) == 1
        regions = preds[0]["result"]
        polys = [r for r in regions if r["type"] == "polygonlabels"]
        brushes = [r for r in regions if r["type"] == "brushlabels"]
        assert len(polys) + len(brushes) == len(regions)
        for r in regions:
            assert (r["original_width"], r["original_height"], r["image_rotation"]) == (gt["width"], gt["height"], 0)
        masks = [(r["value"]["brushlabels"][0], brush_rle_to_mask(r["value"]["rle"], gt["height"], gt["width"]) > 0)
                 for r in brushes]
        assert all(r["value"]["format"] == "rle" for r in brushes)
        if index < 5:  # brush masks are exactly detserve's own masks
            own = [d for d in own_predictions(detserve, "rtmdet-ins", gt["path"]) if d["class_name"] in LABEL_OF]
            assert len(masks) == len(own)
            for (label, m), d in zip(masks, own):
                assert label == LABEL_OF[d["class_name"]]
                assert np.array_equal(m, mask_utils.decode(d["segmentation"]).astype(bool))
        truth = [(LABEL_OF[c], mask_utils.decode(seg).astype(bool)) for c, _, seg in gt["objects"] if c in LABEL_OF]
        objects += len(truth)
        for kind, found in (("polygon", [(r["value"]["polygonlabels"][0], polygon_mask(r)) for r in polys]),
                            ("brush", masks)):
            hits = matches(found, truth, mask_iou)
            totals[kind] = [totals[kind][0] + hits[0], totals[kind][1] + hits[1], totals[kind][2] + len(found)]
    for kind, (recalled, precise, regions_seen) in totals.items():
        print(f"{kind}: {recalled}/{objects} shapes found at mask IoU >= 0.7, {precise}/{regions_seen} regions correct")
        if detserve["trained"]:
            assert recalled >= MIN_MASK_RECALL * objects, kind


def test_legacy_token_fetch_from_real_label_studio(label_studio, shapes):
    """The /data/upload path with the legacy `Token` scheme (the server above uses the PAT)."""
    import asyncio

    from service.protocols.labelstudio.fetch import FetchConfig, ImageFetcher, ImageFetchError, TokenCache

    url, auth = label_studio["url"], {"Authorization": f"Token {LEGACY_TOKEN}"}
    project = httpx.post(f"{url}/api/projects", headers=auth, timeout=60,
                         json={"title": "legacy token", "label_config": RECT_CONFIG}).json()["id"]
    path = next(iter(shapes.values()))["path"]
    with open(path, "rb") as fh:
        httpx.post(f"{url}/api/projects/{project}/import", headers=auth, files={"file0": (Path(path).name, fh)},
                   timeout=120).raise_for_status()
    image = httpx.get(f"{url}/api/projects/{project}/tasks", headers=auth, timeout=60).json()[0]["data"]["image"]
    assert image.startswith("/data/upload/")

    async def fetch(key):
        async with httpx.AsyncClient() as client:
            return await ImageFetcher(FetchConfig(url=url, api_key=key), client, TokenCache()).fetch(image)

    assert asyncio.run(fetch(LEGACY_TOKEN)) == Path(path).read_bytes()
    assert asyncio.run(fetch(label_studio["pat"])) == Path(path).read_bytes()
    with pytest.raises(ImageFetchError, match="401"):
        asyncio.run(fetch(None))
