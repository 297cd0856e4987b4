"""`detserve doctor`: what this machine can run, and an actionable line for every known mismatch.

Every probe tolerates a missing library, driver or GPU (a probe that fails becomes a finding, never
a crash). Model checks build each configured model on its configured device and run one image.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

OK, WARN, ERROR = "ok", "warn", "error"


@dataclass
class Finding:
    level: str  # ok | warn | error
    topic: str
    message: str  # what is wrong and what to do


@dataclass
class Report:
    facts: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    models: dict[str, Finding] = field(default_factory=dict)

    def add(self, level: str, topic: str, message: str) -> None:
        self.findings.append(Finding(level, topic, message))

    @property
    def models_ok(self) -> bool:
        return all(f.level != ERROR for f in self.models.values())

    def render(self) -> str:
        width = max((len(k) for k in self.facts), default=0)
        lines = ["detserve doctor", ""] + [f"  {k.ljust(width)}  {v}" for k, v in self.facts.items()]
        problems = [f for f in self.findings if f.level != OK]
        lines += ["", "findings:" if problems else "findings: none, the environment looks consistent"]
        lines += [f"  [{f.level.upper()}] {f.topic}: {f.message}" for f in problems]
        if self.models:
            lines += ["", "models:"]
            lines += [f"  [{f.level.upper()}] {name}: {f.message}" for name, f in self.models.items()]
        return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_cuda_version() -> tuple[int | None, str | None]:
    """(CUDA version the driver supports as 12040-style int, why not) via libcuda's cuDriverGetVersion."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "libcuda.so.1 (the NVIDIA driver library) is not installed"
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None, "cuDriverGetVersion failed"
    return version.value, None


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    return out.stdout.strip().replace("\n", "; ") or out.stderr.strip()


def _runtime_cuda_version() -> str | None:
    try:
        from cuda.bindings import runtime

        err, version = runtime.cudaRuntimeGetVersion()
        return f"{version // 1000}.{version % 1000 // 10} (cuda-bindings)" if int(err) == 0 else None
    except Exception:
        pass
    from .backends.onnxrt import CUDA_LIBS, loadable

    name = loadable(CUDA_LIBS)
    if name is None:
        return None
    version = ctypes.c_int(0)
    if ctypes.CDLL(name).cudaRuntimeGetVersion(ctypes.byref(version)) == 0:
        return f"{version.value // 1000}.{version.value % 1000 // 10} ({name})"
    return None


def _fmt_cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_torch(report: Report) -> None:
    import torch

    report.facts["torch"] = torch.__version__
    built = torch.version.cuda
    report.facts["torch CUDA build"] = built or "none (CPU-only build)"
    try:
        report.facts["cuDNN"] = str(torch.backends.cudnn.version()) if built else "n/a"
    except Exception as exc:  # a broken cuDNN install raises here
        report.facts["cuDNN"] = f"unavailable ({exc})"
        report.add(WARN, "cuDNN", f"torch cannot load cuDNN ({exc}); reinstall torch so its nvidia-cudnn wheel matches")
    driver, why = _driver_cuda_version()
    report.facts["driver CUDA"] = _fmt_cuda(driver) if driver else f"none ({why})"
    report.facts["nvidia-smi"] = _nvidia_smi() or "not found"
    report.facts["runtime CUDA"] = _runtime_cuda_version() or "not found"
    available = torch.cuda.is_available()
    if built and driver is None:
        report.add(WARN, "CUDA", f"torch {torch.__version__} is a CUDA {built} build but no NVIDIA driver was found "
                   f"({why}): models configured with device = \"cuda\" cannot run here. Install the NVIDIA driver "
                   f"(one that supports CUDA >= {built}), or use device = \"cpu\"/\"auto\"; for CPU-only hosts the "
                   "smaller wheel is `pip install torch --index-url https://download.pytorch.org/whl/cpu`.")
    elif built and driver is not None:
        need = int(built.split(".")[0]) * 1000 + int(built.split(".")[1]) * 10
        if driver < need and not available:
            report.add(ERROR, "CUDA", f"the driver supports CUDA {_fmt_cuda(driver)} but torch was built for CUDA "
                       f"{built}: upgrade the NVIDIA driver or install a torch wheel for CUDA <= {_fmt_cuda(driver)}")
    gpus = []
    if available:
        arch_list = torch.cuda.get_arch_list()
        report.facts["torch arch list"] = " ".join(arch_list)
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            name = torch.cuda.get_device_name(i)
            gpus.append(f"cuda:{i} {name} (sm_{major}{minor})")
            if not kernel_image_available(major, minor, arch_list):
                report.add(ERROR, "no kernel image", f"cuda:{i} {name} has compute capability {major}.{minor} "
                           f"(sm_{major}{minor}) but this torch build has kernels for {', '.join(arch_list)}: "
                           "expect 'CUDA error: no kernel image is available for execution on the device'. "
                           f"Install a torch build that includes sm_{major}{minor} (see pytorch.org/get-started).")
    report.facts["GPUs"] = "; ".join(gpus) if gpus else "none"


def kernel_image_available(major: int, minor: int, arch_list: list[str]) -> bool:
    """True when torch ships SASS for this GPU (same major, minor <= GPU) or PTX it can JIT (compute_XY <= GPU)."""
    cc = major * 10 + minor
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        digits = "".join(ch for ch in num if ch.isdigit())
        if not digits:
            continue
        value = int(digits)
        if kind == "sm" and value // 10 == major and value <= cc:
            return True
        if kind == "compute" and value <= cc:
            return True
    return False


def check_torchvision(report: Report) -> None:
    import torch

    try:
        import torchvision
        from torchvision.ops import nms
    except Exception as exc:
        report.facts["torchvision"] = f"cannot import ({exc})"
        report.add(ERROR, "torchvision", f"import failed: {exc}; install the torchvision that matches torch "
                   f"{torch.__version__} (pip install torchvision with the same index URL)")
        return
    report.facts["torchvision"] = torchvision.__version__
    torch_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    tv_minor = tuple(int(x) for x in torchvision.__version__.split("+")[0].split(".")[:2])
    # torchvision 0.(N+15) pairs with torch 2.N since torch 2.0 / torchvision 0.15
    if torch_minor[0] == 2 and tv_minor != (0, torch_minor[1] + 15):
        report.add(ERROR, "torchvision", f"torchvision {torchvision.__version__} does not match torch {torch.__version__} "
                   f"(expected 0.{torch_minor[1] + 15}.x): install matching versions or ops such as nms fail with "
                   "'operator torchvision::nms does not exist'")
    tv_cuda = _normalize_cuda(getattr(torchvision.version, "cuda", None))
    if tv_cuda != _normalize_cuda(torch.version.cuda):
        report.add(ERROR, "torchvision", f"torchvision was built for CUDA {tv_cuda} but torch for CUDA {torch.version.cuda}; "
                   "install both from the same index URL")
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    results = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        try:
            keep = nms(boxes.to(device), scores.to(device), 0.5).cpu().tolist()
            good = keep == [0, 2]
            results.append(f"{device} {'ok' if good else f'wrong result {keep}'}")
            if not good:
                report.add(ERROR, "torchvision ops", f"nms on {device} returned {keep}, expected [0, 2]")
        except Exception as exc:
            results.append(f"{device} failed")
            report.add(ERROR, "torchvision ops", f"nms on {device} failed: {str(exc).splitlines()[0]}; reinstall "
                       "torchvision built for this torch (same version pairing and CUDA variant)")
    report.facts["torchvision nms"] = ", ".join(results)


def _normalize_cuda(version) -> str | None:
    """'13.0', '13000' or 13000 -> '13.0' (torchvision reports the integer form)."""
    if version in (None, "", "None"):
        return None
    text = str(version)
    if text.isdigit() and int(text) >= 1000:
        return _fmt_cuda(int(text))
    return ".".join(text.split(".")[:2])


def check_onnxruntime(report: Report) -> None:
    try:
        import onnxruntime as ort
    except Exception as exc:
        report.facts["onnxruntime"] = f"cannot import ({exc})"
        report.add(WARN, "onnxruntime", f"import failed ({exc}): backend = \"onnxruntime\" is unavailable; "
                   "pip install onnxruntime-gpu (or onnxruntime for CPU only)")
        return
    from .backends.onnxrt import CUDA_LIBS, CUDNN_LIBS, TENSORRT_LIBS, loadable

    report.facts["onnxruntime"] = ort.__version__
    available = ort.get_available_providers()
    report.facts["ORT providers"] = ", ".join(available)
    dists = [d for d in ("onnxruntime", "onnxruntime-gpu") if _version(d)]
    if len(dists) > 1:
        report.add(WARN, "onnxruntime", "both onnxruntime and onnxruntime-gpu are installed and overwrite each other's "
                   "files: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    try:
        import tensorrt  # noqa: F401

        trt_version = getattr(tensorrt, "__version__", "?")
    except Exception:
        trt_version = None
    nvinfer = loadable(TENSORRT_LIBS)
    report.facts["TensorRT"] = f"{trt_version or 'python package not installed'}; libnvinfer: {nvinfer or 'not found'}"
    if "TensorrtExecutionProvider" in available and nvinfer is None:
        report.add(WARN, "TensorRT EP", "onnxruntime lists TensorrtExecutionProvider but libnvinfer cannot be loaded: "
                   "ONNX Runtime will fall back to CUDA/CPU. pip install tensorrt (the major version this onnxruntime "
                   "was built against) or remove \"tensorrt\" from [onnxruntime] providers")
    if "CUDAExecutionProvider" in available:
        missing = [libs[0].split(".so")[0] for libs in (CUDA_LIBS, CUDNN_LIBS) if loadable(libs) is None]
        if missing:
            report.add(WARN, "CUDA EP", f"onnxruntime lists CUDAExecutionProvider but {', '.join(missing)} cannot be "
                       "loaded: install the CUDA runtime and cuDNN it needs (pip install nvidia-cuda-runtime-cu12 "
                       "nvidia-cudnn-cu12, or import torch first which ships them) or it falls back to CPU")
        driver, _ = _driver_cuda_version()
        if driver is None:
            report.add(WARN, "CUDA EP", "onnxruntime-gpu is installed but there is no NVIDIA driver: the CUDA and TensorRT "
                       "providers are listed but cannot run; detserve skips them and uses CPUExecutionProvider")


def check_models(report: Report, store: Path) -> None:
    """Build every model of the store on its configured device and run one generated image."""
    from .errors import DetserveError
    from .settings import discover_models, load_model_config

    folders = discover_models(store)
    if not folders:
        report.models["(store)"] = Finding(ERROR, str(store), f"no model folders (<name>/model.toml) under {store}")
        return
    for name, folder in folders.items():
        try:
            cfg = load_model_config(folder)
            report.models[name] = check_model(cfg)
        except DetserveError as exc:
            report.models[name] = Finding(ERROR, name, exc.message)


def check_model(cfg) -> Finding:
    import numpy as np
    import torch

    from .errors import DetserveError
    from .pipeline.predictor import Predictor
    from .types import DetectOptions, DetectResult, RawImage

    where = f"backend {cfg.backend.value}, device {cfg.device}"
    if cfg.device.startswith("cuda"):
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            reason = "no NVIDIA driver/GPU is usable" if count == 0 else f"only {count} GPU(s)"
            return Finding(ERROR, cfg.name, f"configured device = \"{cfg.device}\" but {reason} here: set device = \"cpu\" "
                           "(or \"auto\") in its model.toml, or run it on a GPU host (see the findings above)")
    try:
        predictor = Predictor.from_config(cfg)
    except DetserveError as exc:
        return Finding(ERROR, cfg.name, f"cannot load ({where}): {exc.message}")
    except Exception as exc:
        return Finding(ERROR, cfg.name, f"cannot load ({where}): {type(exc).__name__}: {exc}")
    try:
        image = np.full((64, 80, 3), 114, dtype=np.uint8)
        out = predictor.predict([RawImage(pixels=image.tobytes(), height=64, width=80, channel_order="BGR")],
                                [DetectOptions()])[0]
        if not isinstance(out, DetectResult):
            return Finding(ERROR, cfg.name, f"loads but a test image fails ({where}): {out}")
        detail = where
        backend = getattr(predictor, "_backend", None)
        providers = getattr(backend, "providers", None)
        if providers:
            detail += f", running on {providers[0]}"
        message = f"runs ({detail}, {len(predictor.classes)} classes)"
        if cfg.backend.value == "auto" and predictor.backend_reason:  # the load above made (or reused) auto's choice: say which and why
            message += f"; {predictor.backend_reason}"
        return Finding(OK, cfg.name, message)
    except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory on a GPU the server holds
        return Finding(ERROR, cfg.name, f"loads but a test image fails ({where}): {type(exc).__name__}: {exc}")
    finally:
        predictor.close()


def diagnose(model_store: Path | None = None) -> Report:
    report = Report()
    report.facts["python"] = f"{sys.version.split()[0]} ({platform.platform()})"
    for probe in (check_torch, check_torchvision, check_onnxruntime):
        try:
            probe(report)
        except Exception as exc:  # a probe must never take the doctor down
            report.add(WARN, probe.__name__, f"probe failed: {type(exc).__name__}: {exc}")
    from .backends.auto import cache_root

    report.facts["auto cache"] = f"{cache_root()} (backend = \"auto\" exports and parity verdicts; DETSERVE_CACHE_DIR)"
    if model_store is not None:
        check_models(report, model_store)
    return report
