"""`detserve doctor`: the report on this (GPU-less) machine and model checks with exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.cli import main
from service.doctor import diagnose, kernel_image_available


def write_model(store, name: str, **fields) -> None:
    folder = store / name
    folder.mkdir(parents=True)
    lines = [f'{k} = {json.dumps(v)}' for k, v in {"arch": "null", **fields}.items()]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")


def test_report_lists_the_stack(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for key in ("python", "torch", "torch CUDA build", "cuDNN", "driver CUDA", "runtime CUDA", "GPUs",
                "torchvision", "torchvision nms", "onnxruntime", "ORT providers", "TensorRT"):
        assert f"  {key} " in out, key
    assert "cpu ok" in out  # torchvision nms really ran


def test_cuda_build_without_driver_is_explained():
    report = diagnose()
    if torch.version.cuda and not torch.cuda.is_available():
        messages = " ".join(f.message for f in report.findings if f.topic == "CUDA")
        assert "no NVIDIA driver" in messages and 'device = "cpu"' in messages
        if "TensorrtExecutionProvider" in report.facts.get("ORT providers", "") and "not found" in report.facts["TensorRT"]:
            assert any(f.topic == "TensorRT EP" and "libnvinfer" in f.message for f in report.findings)


def test_model_on_missing_gpu_fails_with_actionable_message(tmp_path, capsys):
    write_model(tmp_path, "ok", device="cpu")
    write_model(tmp_path, "gpu", device="cuda")
    code = main(["doctor", "--model-store", str(tmp_path)])
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        assert code == 0
        return
    assert code == 1
    assert "[OK] ok: runs" in out
    assert '[ERROR] gpu: configured device = "cuda"' in out and 'set device = "cpu"' in out


def test_model_store_all_runnable_exits_zero_and_json(tmp_path, capsys):
    write_model(tmp_path, "a", device="cpu")
    assert main(["doctor", "--model-store", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"]["a"]["level"] == "ok"
    assert "torch" in data["facts"]


def test_broken_model_config_is_reported(tmp_path, capsys):
    write_model(tmp_path, "bad", arch="rtmdet-tiny", weights="missing.pth", device="cpu")
    assert main(["doctor", "--model-store", str(tmp_path)]) == 1
    assert "missing.pth" in capsys.readouterr().out


def test_kernel_image_rules():
    arch = ["sm_75", "sm_80", "sm_86", "sm_90"]
    assert kernel_image_available(8, 6, arch)
    assert kernel_image_available(8, 9, arch)  # sm_86 SASS runs on 8.9
    assert not kernel_image_available(6, 1, arch)  # Pascal: "no kernel image is available"
    assert not kernel_image_available(12, 0, arch)
    assert kernel_image_available(12, 0, arch + ["compute_90"])  # PTX JIT


BUNDLED = Path(__file__).resolve().parents[2] / "models" / "rtmdet"


@pytest.mark.skipif(not (BUNDLED / "weights.pth").is_file(), reason="models/rtmdet not shipped")
def test_doctor_says_what_backend_auto_chose_and_why(tmp_path, capsys):
    (tmp_path / "rtmdet").symlink_to(BUNDLED)  # backend left to its default, "auto"
    assert main(["doctor", "--model-store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "  auto cache " in out
    line = next(line for line in out.splitlines() if "] rtmdet:" in line)
    assert "backend auto" in line and "auto: onnxruntime cpu (PASS: " in line, line
