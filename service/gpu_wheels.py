"""The serving stack as wheels, for `gpu-check` on a lent GPU machine that cannot reach a package index.

That machine (/work/.library/device in this workplace; any bare CUDA box elsewhere) brings its own
Python with torch, torchvision, numpy, onnx, OpenCV and Pillow, but not FastAPI, uvicorn, pydantic,
pycocotools or our gRPC pins, and nothing can be downloaded there. So:
  here:  `make gpu-wheels`  downloads what is missing, for that machine's Python, at the versions
         installed in this virtualenv (the ones the suite passed with), into .whl/;
  there: `python3 -m service.gpucheck --wheels .whl` unpacks them into a folder put first on
         PYTHONPATH and runs the check with the machine's own torch.
What stays out: the frameworks that machine already has, and onnxruntime-gpu (255 MB, over what a
call may carry): there ONNX Runtime is the machine's own, and the TensorRT / CUDA EP rows say when
its build lacks those providers.
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

# httptools and uvloop come with uvicorn[standard]: named here, since extras are not followed. The
# rest is detserve's own run-time requirements (pyproject's dependencies), read from its metadata.
EXTRA_ROOTS = ("httptools", "uvloop")
# On the GPU machine already, and large: carrying them would shadow a CUDA-matched build or not fit.
# grpcio-tools generates the stubs only.
LEAVE_OUT = re.compile(r"^(torch|torchvision|numpy|onnx|onnxscript|onnx-ir|onnxruntime(-gpu)?|opencv-python(-headless)?"
                       r"|pillow|triton|nvidia-.*|cuda-.*|sympy|networkx|jinja2|markupsafe|fsspec|filelock|mpmath"
                       r"|setuptools|ml-dtypes|grpcio-tools)$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required(requirements) -> list[str]:
    """Distribution names of requirement strings, those only an extra asks for left out."""
    return [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requirements or () if "extra ==" not in r]


def closure(roots=None, leave_out: re.Pattern = LEAVE_OUT) -> dict[str, str]:
    """{distribution: installed version} for `roots` (default: detserve's requirements and
    EXTRA_ROOTS) and everything they require here (extras ignored, environment markers evaluated by
    nothing: a conditional requirement that is not installed here is skipped), without the
    distributions `leave_out` matches."""
    found: dict[str, str] = {}
    pending = list(roots) if roots is not None else _required(metadata.requires("detserve")) + list(EXTRA_ROOTS)
    while pending:
        name = _norm(pending.pop())
        if name in found or leave_out.match(name):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. `colorama; sys_platform == "win32"`
        found[name] = dist.version
        pending += _required(dist.requires)
    return found


def fetch_wheels(dest: Path, python_version: str = "3.12", pins: dict[str, str] | None = None) -> list[Path]:
    """Download one wheel per pinned distribution for CPython `python_version` on x86-64 Linux."""
    pins = closure() if pins is None else pins
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()  # two versions of one package make `pip install --no-index` refuse them all
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{name}=={version}" for name, version in sorted(pins.items())], check=True)
    return sorted(dest.glob("*.whl"))


def install_wheels(src: Path, target: Path) -> int:
    """Unpack every wheel in `src` into `target` (no index, no dependency resolution); returns how many."""
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {src}: run `make gpu-wheels` on a machine with a network first")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    return len(wheels)
