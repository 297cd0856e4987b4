"""`detserve eval`: COCO metrics in-process through the Predictor and over the TorchServe REST API."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from service.cli import main
from service.demo.dataset import make_dataset

SIZES = [(320, 240), (240, 320), (500, 300), (300, 300)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ann = make_dataset(root, len(SIZES), seed=9001, sizes=SIZES)
    return root, ann


def _perfect_answers(root, ann) -> dict[str, list[dict]]:
    """TorchServe-style JSON equal to the ground truth, keyed by the image bytes' sha256."""
    data = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image: dict[int, list[dict]] = {i["id"]: [] for i in data["images"]}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image[a["image_id"]].append({"class_label": a["category_id"] - 1, "class_name": names[a["category_id"]],
                                        "bbox": [x, y, x + w, y + h], "score": 0.9,
                                        "segmentation": a["segmentation"]})
    return {hashlib.sha256((root / i["file_name"]).read_bytes()).hexdigest(): by_image[i["id"]]
            for i in data["images"]}


def test_eval_over_rest_scores_perfect_answers_as_ap_1(dataset, tmp_path, capsys):
    root, ann = dataset
    answers = _perfect_answers(root, ann)
    seen_paths = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen_paths.append(self.path)
            payload = json.dumps(answers[hashlib.sha256(body).hexdigest()]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "metrics.json"
        rc = main(["eval", "--model", "shapes", "--ann", str(ann), "--url",
                   f"http://127.0.0.1:{server.server_address[1]}", "--json", str(out), "--quiet",
                   "--tile", "256", "--tile-merge", "nmm"])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    assert len(seen_paths) == len(SIZES) and all(p.startswith("/predictions/shapes?") for p in seen_paths)
    assert all("tile=256" in p and "tile_merge=nmm" in p and "tile_overlap" not in p for p in seen_paths)
    assert metrics["recall50"] == pytest.approx(1.0)
    assert "bbox: AP=1.000" in capsys.readouterr().out


def test_eval_in_process_with_the_bundled_detector(dataset, tmp_path):
    root, ann = dataset
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", "rtmdet", "--ann", str(ann), "--json", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == len(SIZES) and metrics["segm"] is None
    assert metrics["bbox"]["AP50"] >= 0.8


def test_eval_reports_a_missing_model_clearly(dataset, capsys):
    _, ann = dataset
    assert main(["eval", "--model", "no-such-model", "--ann", str(ann)]) == 2
    assert "no model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize("content, words", [("{not json", "not valid JSON"),
                                             ('{"images": 5}', "not a COCO annotation file")])
def test_eval_reports_a_bad_annotation_file_clearly(tmp_path, capsys, content, words):
    ann = tmp_path / "instances.json"
    ann.write_text(content)
    assert main(["eval", "--model", "rtmdet", "--ann", str(ann), "--quiet"]) == 2
    assert words in capsys.readouterr().err


def test_eval_batch_size_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "rtmdet", "--ann", str(tmp_path / "x.json"), "--batch-size", "0"])
    assert "positive whole number" in capsys.readouterr().err


def test_recall_counts_each_ground_truth_once_with_the_right_class_above_the_score_floor(dataset):
    from service.demo.evaluate import load_coco, recall_at_iou

    _, ann = dataset
    coco = load_coco(ann)
    gts = coco.loadAnns(coco.getAnnIds())
    hit = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
           for a in gts]
    assert recall_at_iou(coco, hit) == pytest.approx(1.0)
    first = gts[0]
    wrong_class = {**hit[0], "category_id": first["category_id"] % 5 + 1}
    shifted = {**hit[0], "bbox": [first["bbox"][0] + first["bbox"][2] * 0.6, *first["bbox"][1:]]}  # IoU 0.25
    rest = hit[1:]
    for extra in (wrong_class, shifted, {**hit[0], "score": 0.1}):
        assert recall_at_iou(coco, rest + [extra], score_thr=0.3) == pytest.approx((len(gts) - 1) / len(gts))
    assert recall_at_iou(coco, rest + [hit[1]]) == pytest.approx((len(gts) - 1) / len(gts))  # one box, one object
