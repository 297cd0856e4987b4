"""The wheels that let gpu-check run on a GPU machine with torch but no serving stack and no network."""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.gpu_wheels import closure, install_wheels
from service.gpucheck import NO_GPU_EXIT, _without_option

REPO = Path(__file__).resolve().parents[2]


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, name: str = "carried_probe", version: str = "1.0") -> Path:
    """A real (tiny, pure-Python) wheel, built here so the test needs no index."""
    files = {
        f"{name}/__init__.py": b"WHERE = 'carried'\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join(_record_line(n, d) for n, d in files.items()) + f"\n{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for n, d in files.items():
            wheel.writestr(n, d)
        wheel.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


def test_the_closure_pins_the_serving_stack_as_installed_here_and_leaves_the_frameworks_out():
    pins = closure()
    for name in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "pydantic-core", "pycocotools",
                 "grpcio", "protobuf"):
        assert pins[name] == metadata.version(name), name
    for framework in ("torch", "torchvision", "numpy", "onnxruntime-gpu", "opencv-python-headless", "pillow"):
        assert framework not in pins
    assert not any(name.startswith("nvidia-") for name in pins)
    assert "grpcio-tools" not in pins  # stub generation only


@pytest.mark.parametrize("argv, expected", [
    (["--wheels", ".whl", "--skip-tests"], ["--skip-tests"]),
    (["--json", "x.json", "--wheels=.whl"], ["--json", "x.json"]),
    (["--budget-s", "300"], ["--budget-s", "300"]),
])
def test_the_re_run_drops_only_the_wheels_option(argv, expected):
    assert _without_option(argv, "--wheels") == expected


def test_install_unpacks_the_wheels_into_a_folder_that_imports(tmp_path):
    (tmp_path / "wheels").mkdir()
    make_wheel(tmp_path / "wheels")
    assert install_wheels(tmp_path / "wheels", tmp_path / "site") == 1
    probe = subprocess.run([sys.executable, "-c", "import carried_probe; print(carried_probe.WHERE)"],
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert probe.stdout.strip() == "carried", probe.stderr


def test_no_wheels_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make gpu-wheels"):
        install_wheels(tmp_path, tmp_path / "site")


def test_gpucheck_installs_the_carried_wheels_then_runs_again_with_them(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("with a GPU this would run the whole check")
    (tmp_path / "wheels").mkdir()
    make_wheel(tmp_path / "wheels")
    proc = subprocess.run([sys.executable, "-m", "service.gpucheck", "--wheels", str(tmp_path / "wheels")],
                          cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=120)
    site = tmp_path / "detserve-gpucheck-site"
    assert (site / "carried_probe" / "__init__.py").is_file()
    # The second run is the one that found no GPU, and it says where its serving stack came from.
    assert proc.returncode == NO_GPU_EXIT, proc.stderr
    assert f"1 wheels from {tmp_path / 'wheels'} in {site}" in proc.stderr
    assert "Traceback" not in proc.stderr
