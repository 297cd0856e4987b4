"""`detserve predict` through the real CLI on generated images and a temporary model folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from service.cli import main
from service.detectors.checkpoint import save_checkpoint
from service.detectors.registry import build_detector

CLASSES = ["square", "circle"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    folder = store / "shapes"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", len(CLASSES))
    for module in model.modules():  # default init lets activations vanish; keep the scores varied
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    state_dict = model.state_dict()
    for key, value in state_dict.items():
        if key.startswith("bbox_head.rtm_reg.") and key.endswith(".bias"):
            value.fill_(1.5)  # positive distances: boxes with area
    save_checkpoint(folder / "weights.pth", state_dict, CLASSES)
    (folder / "model.toml").write_text('backend = "eager"\narch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 128\n'
                                       'default_score_thr = 0.0\ndevice = "cpu"\n')
    return store


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img = np.full((150, 240, 3), 200, np.uint8)
    cv2.rectangle(img, (30, 40), (90, 110), (20, 20, 220), -1)
    cv2.circle(img, (170, 75), 35, (200, 40, 40), -1)
    path = tmp_path_factory.mktemp("img") / "shapes.jpg"
    cv2.imwrite(str(path), img)
    return path


def test_predict_prints_torchserve_json_with_boxes_inside_the_image(store, image, capsys):
    rc = main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--max-dets", "20"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    detections = json.loads(out[0])
    assert 0 < len(detections) <= 20
    for d in detections:
        assert set(d) == {"class_label", "class_name", "bbox", "score"}
        assert d["class_name"] == CLASSES[d["class_label"]]
        x1, y1, x2, y2 = d["bbox"]
        assert 0 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 150
        assert 0.0 <= d["score"] <= 1.0


def test_options_draw_and_several_images(store, image, tmp_path, capsys):
    second = tmp_path / "second.png"
    cv2.imwrite(str(second), np.zeros((64, 48, 3), np.uint8))
    draw = tmp_path / "out.png"
    folder = store / "shapes"  # a folder path works as well as a name
    rc = main(["predict", str(image), str(second), "--model", str(folder), "--score-thr", "0.2",
               "--classes", "circle", "--max-dets", "5", "--draw", str(draw)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    for line in lines:
        dets = json.loads(line)
        assert len(dets) <= 5 and all(d["class_name"] == "circle" and d["score"] >= 0.2 for d in dets)
    first_drawn = cv2.imread(str(tmp_path / "out-shapes.png"))
    second_drawn = cv2.imread(str(tmp_path / "out-second.png"))
    assert first_drawn.shape == (150, 240, 3) and second_drawn.shape == (64, 48, 3)


def test_bad_inputs_report_errors_and_exit_nonzero(store, image, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    rc = main(["predict", str(text), str(image), str(tmp_path / "missing.jpg"), "--model", "shapes",
               "--model-store", str(store)])
    captured = capsys.readouterr()
    assert rc == 1
    assert len(captured.out.strip().splitlines()) == 1  # the good image still printed
    assert "unsupported_media_type" in captured.err and "missing.jpg" in captured.err
    assert main(["predict", str(image), "--model", "nope", "--model-store", str(store)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--classes", "dog"]) == 1
    assert "dog" in capsys.readouterr().err
    # An output that cannot be written is a one-line error before any detection is printed.
    for draw, words in ((tmp_path, "is a folder"), (tmp_path / "no" / "out.png", "does not exist")):
        assert main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--draw", str(draw)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(f"detserve: --draw {draw}: ") and words in captured.err


def test_bad_model_folders_are_config_errors_naming_the_file_or_field(tmp_path, capsys):
    binary = tmp_path / "store" / "binary"
    binary.mkdir(parents=True)
    (binary / "model.toml").write_bytes(b'name = "x"\n' + bytes(range(128, 256)))
    climbing = tmp_path / "store" / "climbing"
    climbing.mkdir()
    (climbing / "model.toml").write_text('arch = "rtmdet-tiny"\nweights = "../../../../etc/passwd"\n')
    for folder, words in ((binary, "not valid TOML"), (climbing, "field 'weights'")):
        assert main(["predict", str(folder / "model.toml"), "--model", str(folder)]) == 2
        assert words in capsys.readouterr().err


def test_console_entry_point(store, image):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "service", "predict", str(image), "--model", "shapes", "--model-store", str(store)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)


# ---- issue 18: the default model and the knob flags ------------------------------------------

def _copy_model(src: Path, dst: Path, classes: list[str] | None = None) -> None:
    dst.mkdir(parents=True)
    os.symlink(src / "weights.pth", dst / "weights.pth")
    toml = (src / "model.toml").read_text()
    (dst / "model.toml").write_text(toml + (f"classes = {json.dumps(classes)}\n" if classes else ""))


def test_predict_without_model_uses_the_default_model(store, image, tmp_path, monkeypatch, capsys):
    from service.settings import BUNDLED_DEFAULT_MODEL

    two = tmp_path / "two"
    _copy_model(store / "shapes", two / BUNDLED_DEFAULT_MODEL)
    _copy_model(store / "shapes", two / "zeta", ["x", "y"])
    monkeypatch.delenv("DETSERVE_DEFAULT_MODEL", raising=False)

    def classes_printed(*argv) -> set[str]:
        assert main(["predict", str(image), "--score-thr", "0", *argv]) == 0
        names = {d["class_name"] for d in json.loads(capsys.readouterr().out)}
        assert names  # score_thr 0: the random model always has detections, so the classes tell the model
        return names

    assert classes_printed("--model-store", str(two)) <= set(CLASSES)  # the bundled default, as `make serve`
    monkeypatch.setenv("DETSERVE_DEFAULT_MODEL", "zeta")
    assert classes_printed("--model-store", str(two)) <= {"x", "y"}  # the configured default wins
    monkeypatch.delenv("DETSERVE_DEFAULT_MODEL")
    assert classes_printed("--model-store", str(store)) <= set(CLASSES)  # the only model of a store
    (two / BUNDLED_DEFAULT_MODEL / "model.toml").unlink()
    _copy_model(store / "shapes", two / "omega")
    assert main(["predict", str(image), "--model-store", str(two)]) == 2
    assert "DETSERVE_DEFAULT_MODEL" in capsys.readouterr().err


def test_default_model_rule_is_the_grpc_doors_rule():
    from service.errors import ModelNotFound
    from service.settings import default_model_name

    assert default_model_name("b", ["a", "b"]) == "b" and default_model_name(None, ["a"]) == "a"
    assert default_model_name(None, ["a", "rtmdet", "z"]) == "rtmdet"
    with pytest.raises(ModelNotFound):
        default_model_name(None, ["a", "z"])


def test_knob_flags_give_the_predictors_result_rendered_as_asked(store, image, capsys):
    from service.pipeline.predictor import Predictor
    from service.protocols.render import box_to
    from service.settings import load_model_config
    from service.types import BoxFormat, DetectOptions, EncodedImage

    rc = main(["predict", str(image), "--model", "shapes", "--model-store", str(store), "--score-thr", "0.01",
               "--iou-thr", "0.3", "--class-agnostic", "--box-format", "xywh", "--normalized", "--mask-format", "none",
               "--tile", "off", "--tile-overlap", "0.1", "--tile-merge", "nms"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    predictor = Predictor.from_config(load_model_config(store / "shapes"), threads=1)
    try:
        (want,) = predictor.predict([EncodedImage(image.read_bytes())],
                                    [DetectOptions(score_thr=0.01, iou_thr=0.3, class_agnostic=True)])
        (plain,) = predictor.predict([EncodedImage(image.read_bytes())], [DetectOptions(score_thr=0.01)])
    finally:
        predictor.close()
    assert len(printed) == len(want.detections) < len(plain.detections)
    for got, det in zip(printed, want.detections):
        expected = box_to(det.box_xyxy, BoxFormat.XYWH, True, 240, 150)
        assert np.allclose(got["bbox"], expected, atol=1e-5) and got["class_name"] == det.class_name


@pytest.mark.parametrize("flag, value, allowed", [
    ("--box-format", "yolo", "xyxy, xywh, cxcywh"), ("--iou-thr", "0", "(0, 1]"), ("--tile", "9", "[32, 8192]"),
    ("--normalized", "sure", "true, false, 1, 0"), ("--mask-format", "png", "rle, polygon, none"),
    ("--tile-merge", "wbf", "nms, nmm"), ("--tile-overlap", "0.6", "[0, 0.5]"),
])
def test_bad_knob_flag_exits_2_naming_the_parameter_and_allowed_values(store, image, capsys, flag, value, allowed):
    assert main(["predict", str(image), "--model", "shapes", "--model-store", str(store), flag, value]) == 2
    err = capsys.readouterr().err
    assert flag[2:].replace("-", "_") in err and allowed in err


def test_client_query_parameters_read_back_as_the_same_options():
    """The REST client's wire encoding of the knobs, parsed by the server's own rules."""
    from service.client.transports import query_params
    from service.engine.dataplane import DataPlane
    from service.types import BatchSettings, DetectOptions, MaskFormat, ModelInfo, TileMerge

    info = ModelInfo("m", "m-1", "rtmdet-tiny", "eager", ("a", "b"), 64, True, True, BatchSettings(), max_per_img=100)
    sent = DetectOptions(score_thr=0.25, max_dets=7, classes=("b",), iou_thr=0.4, class_agnostic=False,
                         mask_format=MaskFormat.POLYGON, tile=512, tile_overlap=0.2, tile_merge=TileMerge.NMM)
    params = {k: str(v) for k, v in query_params(sent).items()}  # what reaches the query string
    assert DataPlane(None).options_from(info, params) == sent
    assert DataPlane(None).options_from(info, query_params(DetectOptions(tile="auto"))).tile == "auto"


def test_tile_flag_runs_the_engines_tiling_in_process(store, image, capsys):
    from service.pipeline.predictor import Predictor
    from service.pipeline.tiling import predict_tiled
    from service.settings import load_model_config
    from service.types import DetectOptions, EncodedImage

    argv = ["predict", str(image), "--model", "shapes", "--model-store", str(store), "--score-thr", "0.3"]
    assert main([*argv, "--tile", "64"]) == 0
    tiled = json.loads(capsys.readouterr().out)
    assert main([*argv, "--tile", "off"]) == 0
    whole = json.loads(capsys.readouterr().out)
    predictor = Predictor.from_config(load_model_config(store / "shapes"), device="cpu")
    expected = predict_tiled(predictor, [EncodedImage(image.read_bytes())], DetectOptions(score_thr=0.3, tile=64))[0]
    assert tiled == expected.to_torchserve() and tiled != whole
