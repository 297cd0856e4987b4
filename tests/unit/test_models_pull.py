"""`detserve models pull` against a loopback HTTP server holding a generated mmdet-style .pth."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from service.cli import main
from service.demo.zoo import ZOO, PullError, ZooEntry, pull
from service.detectors.registry import build_detector
from service.settings import load_model_config

CLASSES = [f"thing{i}" for i in range(3)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory served over http://127.0.0.1:<free port>/ with one mmdet-layout checkpoint."""
    root = tmp_path_factory.mktemp("mirror")
    payload = {"meta": {"dataset_meta": {"classes": CLASSES}},
               "state_dict": build_detector("rtmdet-tiny", len(CLASSES)).state_dict()}
    tmp = root / "ckpt.pth"
    torch.save(payload, tmp, _use_new_zipfile_serialization=False)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = f"rtmdet_tiny_test/rtmdet_tiny_test_20250101_000000-{sha[:8]}.pth"
    (root / "rtmdet_tiny_test").mkdir()
    tmp.rename(root / good)
    # The official file name (with the official hash) but our bytes: must fail the check.
    official = ZOO["rtmdet-tiny-coco"].path
    (root / official).parent.mkdir(parents=True)
    (root / official).write_bytes((root / good).read_bytes())
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", good
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_pull_downloads_checks_hash_and_writes_a_loadable_model(served, tmp_path):
    base_url, good = served
    zoo = {"rtmdet-tiny-coco": ZooEntry("rtmdet-tiny-coco", "rtmdet-tiny", good)}
    folder = pull("rtmdet-tiny", tmp_path / "store", base_url=base_url, progress=False, zoo=zoo)
    assert folder == tmp_path / "store" / "rtmdet-tiny-coco"
    cfg = load_model_config(folder)
    assert cfg.arch == "rtmdet-tiny" and cfg.input_size == 640
    assert cfg.classes == CLASSES  # taken from the checkpoint's dataset_meta
    assert cfg.path(cfg.weights).is_file()
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["rtmdet-tiny-coco"]  # no staging left
    with pytest.raises(PullError, match="already exists"):
        pull("rtmdet-tiny-coco", tmp_path / "store", base_url=base_url, progress=False, zoo=zoo)


def test_pull_cli_rejects_a_file_whose_hash_does_not_match_its_name(served, tmp_path, capsys):
    base_url, _ = served
    rc = main(["models", "pull", "rtmdet-tiny-coco", "--store", str(tmp_path), "--base-url", base_url, "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "78e30dcc" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the store


def test_a_download_over_the_size_cap_stops_and_leaves_nothing(served, tmp_path, monkeypatch):
    from service.demo import zoo as zoo_module

    base_url, good = served
    monkeypatch.setattr(zoo_module, "MAX_DOWNLOAD_BYTES", 1000)  # the served checkpoint is far larger
    zoo = {"rtmdet-tiny-coco": ZooEntry("rtmdet-tiny-coco", "rtmdet-tiny", good)}
    with pytest.raises(PullError, match="over 1000 bytes"):
        zoo_module.download(base_url + good, tmp_path / "x.pth", progress=False, max_bytes=1000)
    store = tmp_path / "store"
    with pytest.raises(PullError, match="over"):
        pull("rtmdet-tiny", store, base_url=base_url, progress=False, zoo=zoo)
    assert list(store.iterdir()) == []


def test_pull_cli_without_network_fails_with_a_clear_message(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["models", "pull", "rtmdet-ins-s", "--store", str(tmp_path), "--base-url",
               f"http://127.0.0.1:{port}/", "--quiet"])
    assert rc == 2
    assert "cannot download" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_pull_unknown_name_lists_the_choices(tmp_path, capsys):
    assert main(["models", "pull", "yolo-v99", "--store", str(tmp_path)]) == 2
    assert "rtmdet-ins-x-coco" in capsys.readouterr().err


def test_models_list_shows_the_store(tmp_path, capsys):
    folder = tmp_path / "m1"
    folder.mkdir()
    (folder / "model.toml").write_text('arch = "null"\n')
    assert main(["models", "list", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "m1" in out and "null" in out


def test_two_stage_entries_point_at_mmdet_official_files_and_write_a_valid_model_toml(tmp_path):
    from service.demo.zoo import TWO_STAGE_BASE_URL, lookup, model_toml
    from service.detectors.registry import get_detector
    from service.settings import load_model_config

    two_stage = [e for e in ZOO.values() if get_detector(e.arch).family == "two-stage"]
    assert sorted(e.arch for e in two_stage) == sorted(
        f"{kind}-{backbone}-fpn" for kind in ("faster-rcnn", "mask-rcnn") for backbone in ("r50", "r101", "x101-32x4d"))
    entry = lookup("mask-rcnn-r50-fpn")
    assert entry.base_url == TWO_STAGE_BASE_URL == "https://download.openmmlab.com/mmdetection/v2.0/"
    assert entry.path == "mask_rcnn/mask_rcnn_r50_fpn_1x_coco/mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth"
    assert entry.sha256_prefix == "d4b0c5d6"
    assert lookup("faster-rcnn-x101-32x4d-fpn-coco").sha256_prefix == "cff10310"
    folder = tmp_path / entry.name
    folder.mkdir()
    (folder / "model.toml").write_text(model_toml(entry.name, entry.arch, entry.file_name, None, True, two_stage=True))
    cfg = load_model_config(folder)
    assert cfg.resize_scale == (1333, 800) and cfg.test_cfg.iou_threshold == 0.5
    assert cfg.test_cfg.rpn.max_per_img == 1000 and cfg.test_cfg.rpn.iou_threshold == 0.7
