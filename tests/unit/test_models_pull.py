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
