"""ONNX Runtime backend: our exported graphs (network-only or end2end) and foreign MMDeploy end2end.onnx.

Execution providers are tried in the configured order (default TensorRT > CUDA > CPU). The
onnxruntime-gpu wheel lists the TensorRT and CUDA providers whether or not their libraries or a
GPU exist, so each is checked before it is requested, and the providers the session really got are
logged; anything dropped on the way is a warning, never a crash.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch

from ..detectors.base import get_detector
from ..errors import ConfigError
from ..pipeline.shape_key import PAD_DIVISOR, padded_shape
from ..settings import ModelConfig
from .base import InputDetections, RawOutputs, check_batch

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
END2END_NAMES = ("dets", "labels")

# sonames ORT's TensorRT / CUDA providers dlopen; the first that loads wins
TENSORRT_LIBS = ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
CUDA_LIBS = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so")
CUDNN_LIBS = ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so")


def loadable(sonames: tuple[str, ...]) -> str | None:
    """The first shared library of `sonames` that dlopen finds, else None."""
    for name in sonames:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def _torch_libs_preloaded() -> None:
    """torch (CUDA build) ships libcudart/cudnn as pip packages; importing torch puts them on the loader path."""
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def provider_problem(provider: str, device: str) -> str | None:
    """Why `provider` cannot run for `device` here, or None when it should load."""
    if provider == "cpu":
        return None
    if not device.startswith("cuda"):
        return f"model device is {device!r}"
    if not torch.cuda.is_available():
        return "no usable CUDA device/driver (torch.cuda.is_available() is False)"
    _torch_libs_preloaded()
    if provider == "cuda":
        if loadable(CUDA_LIBS) is None:
            return f"none of {', '.join(CUDA_LIBS)} can be loaded"
        if loadable(CUDNN_LIBS) is None:
            return f"none of {', '.join(CUDNN_LIBS)} can be loaded"
    if provider == "tensorrt" and loadable(TENSORRT_LIBS) is None:
        return f"TensorRT libraries ({', '.join(TENSORRT_LIBS)}) are not installed (pip install tensorrt)"
    return None


def default_threads(cfg: ModelConfig) -> int:
    """Intra-op threads when the caller names none: the same rule as the engine's workers."""
    return cfg.workers.threads_per_worker()


class OnnxRuntimeBackend:
    """Implements `service.backends.base.Backend` on an ONNX file of the model folder."""

    name = "onnxruntime"

    def __init__(self, cfg: ModelConfig, device: str, *, threads: int | None = None, **_unused):
        self.cfg = cfg
        self.device = device
        self.detector = get_detector(cfg.arch)  # knows the graph's input shape and output order
        self.threads = threads or default_threads(cfg)
        self.path = cfg.path(cfg.onnxruntime.model)
        self.providers: list[str] = []  # what the session really runs, best first
        self.end2end = False
        self.has_masks = False
        self._session = None
        self._options = None  # kept for `open_graph`
        self._graphs: dict = {}  # path -> session, opened once per worker
        self._widths: dict = {}  # threads -> (session, options, graphs) of the widths not in use (set_threads)
        self._input_name = ""
        self._output_names: list[str] = []
        self._fixed_batch: int | None = None  # static-batch graphs (e.g. MMDeploy static exports)
        self._shared_arena = False  # CPU sessions draw on the process's one arena (_register_shared_cpu_arena)

    # --- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise ConfigError(
                f"model {self.cfg.name!r}: field 'onnxruntime.model': {self.path} does not exist; "
                f"create it with `detserve export {self.cfg.name} --format onnx`"
            )
        requested = self._usable_providers(ort.get_available_providers())
        self._shared_arena = [p for p, _ in requested] == ["CPUExecutionProvider"] and _register_shared_cpu_arena()
        options = _session_options(self.threads, self._shared_arena)
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=requested)
        except Exception as exc:
            if [p for p, _ in requested] == ["CPUExecutionProvider"]:
                raise ConfigError(f"model {self.cfg.name!r}: cannot load {self.path}: {exc}") from None
            log.warning("model %s: ONNX Runtime session with %s failed (%s); falling back to CPU",
                        self.cfg.name, [p for p, _ in requested], exc)
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=["CPUExecutionProvider"])
        self.providers = session.get_providers()
        wanted = [p for p, _ in requested]
        if self.providers[0] != wanted[0]:
            log.warning("model %s: requested %s but ONNX Runtime runs %s", self.cfg.name, wanted[0], self.providers[0])
        log.info("model %s: ONNX Runtime %s on %s, providers %s, %d intra-op thread(s), %s graph",
                 self.cfg.name, ort.__version__, self.path.name, self.providers, self.threads,
                 "end2end" if self.end2end else "network-only")
        self._session = session
        self._options = options
        self._inspect_graph(session)

    def set_threads(self, threads: int) -> None:
        """Run from now on with `threads` intra-op threads: ONNX Runtime fixes a session's pool when it
        is built, so an elastic worker keeps one session per width (the first switch builds the
        second). CPU sessions only: a GPU batch does not hang on them, and a second TensorRT session
        would build its engine again."""
        import onnxruntime as ort

        if self._session is None or threads == self.threads or self.providers[:1] != ["CPUExecutionProvider"]:
            return
        self._widths[self.threads] = (self._session, self._options, self._graphs)
        if threads in self._widths:
            self._session, self._options, self._graphs = self._widths.pop(threads)
        else:
            options = _session_options(threads, self._shared_arena)
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
            self._options, self._graphs = options, {}
        self.threads = threads

    def _usable_providers(self, available: list[str]) -> list[tuple[str, dict]]:
        chosen: list[tuple[str, dict]] = []
        for key in self.cfg.onnxruntime.providers:
            name = PROVIDER_NAMES[key]
            if name not in available:
                log.warning("model %s: provider %s is not in this onnxruntime build; skipped", self.cfg.name, name)
                continue
            problem = provider_problem(key, self.device)
            if problem is not None:
                level = logging.INFO if not self.device.startswith("cuda") else logging.WARNING
                log.log(level, "model %s: skipping %s: %s", self.cfg.name, name, problem)
                continue
            chosen.append((name, self._provider_options(key)))
        if not any(name == "CPUExecutionProvider" for name, _ in chosen):
            if chosen:
                log.info("model %s: CPU provider appended as the last resort", self.cfg.name)
            else:
                log.warning("model %s: no configured provider can run here; using CPUExecutionProvider", self.cfg.name)
            chosen.append(("CPUExecutionProvider", {}))
        return chosen

    def _provider_options(self, key: str) -> dict:
        device_id = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
        if key == "cuda":
            return {"device_id": device_id}
        if key == "tensorrt":
            ort_cfg = self.cfg.onnxruntime
            cache = self.cfg.path(ort_cfg.trt_cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            return {"device_id": device_id, **trt_profile_options(self.cfg, self._graph_input_name()),
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
                    "trt_fp16_enable": bool(ort_cfg.trt_fp16)}
        return {}

    def _graph_input_name(self) -> str:
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        initializers = {i.name for i in model.graph.initializer}
        return next(i.name for i in model.graph.input if i.name not in initializers)

    def _inspect_graph(self, session) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"model {self.cfg.name!r}: {self.path.name} has {len(inputs)} inputs; expected one image batch")
        shape = inputs[0].shape
        self._input_name = inputs[0].name
        self.detector.check_onnx_input(list(shape), self.cfg, self.path.name)
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None
        names = [o.name for o in session.get_outputs()]
        self.end2end = all(n in names for n in END2END_NAMES)
        if self.end2end:
            self.has_masks = "masks" in names
            self._output_names = [*END2END_NAMES, *(["masks"] if self.has_masks else [])]
        else:
            self._output_names = self.detector.onnx_output_order(names)
            self.has_masks = self.detector.has_masks
        if self.end2end != self.cfg.onnxruntime.end2end:
            log.warning("model %s: onnxruntime.end2end = %s but %s is a %s graph (outputs %s); following the graph",
                        self.cfg.name, self.cfg.onnxruntime.end2end, self.path.name,
                        "end2end" if self.end2end else "network-only", names)

    @property
    def session(self):
        """The main graph's session (multi-piece families run it through `infer`, or directly)."""
        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend.session used before load()")
        return self._session

    def open_graph(self, file_name: str):
        """Another graph of the same model, next to the main file (multi-piece families), on the providers
        the main one got; opened once and kept until `close`."""
        import onnxruntime as ort

        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend.open_graph called before load()")
        path = self.path.with_name(file_name)
        if path not in self._graphs:
            if not path.is_file():
                raise ConfigError(f"model {self.cfg.name!r}: {path} does not exist (it belongs next to "
                                  f"{self.path.name}); create both with `detserve export {self.cfg.name} --format onnx`")
            self._graphs[path] = ort.InferenceSession(str(path), sess_options=self._options, providers=self.providers)
        return self._graphs[path]

    # --- inference -------------------------------------------------------------------------

    def infer(self, batch: torch.Tensor) -> RawOutputs:
        if self._session is None:
            raise RuntimeError("OnnxRuntimeBackend.infer called before load()")
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        step = self._fixed_batch or array.shape[0]
        chunks = []
        for start in range(0, array.shape[0], step):
            part = array[start : start + step]
            real = part.shape[0]
            if real < step:  # a static-batch graph: pad the tail, drop the padding's results
                part = np.concatenate([part, np.zeros((step - real, *part.shape[1:]), np.float32)])
            outs = self._session.run(self._output_names, {self._input_name: part})
            chunks.append([o[:real] for o in outs])
        outputs = [torch.from_numpy(np.concatenate(parts)) for parts in zip(*chunks)]
        if self.end2end:
            masks = outputs[2].float() if self.has_masks else None
            result: RawOutputs = InputDetections(dets=outputs[0].float(), labels=outputs[1].long(), masks=masks)
        else:
            result = tuple(o.float() for o in outputs)
        return check_batch(result, batch.shape[0], self.name)

    def close(self) -> None:
        self._session = None
        self._graphs.clear()
        self._widths.clear()


_shared_cpu_arena: bool | None = None  # registered in this process: None = not tried yet


def _register_shared_cpu_arena() -> bool:
    """One CPU memory arena for every CPU session of this process, registered once.

    Each session otherwise grows an arena of its own to its peak and never gives it back, so an
    elastic worker's two widths held two (rtmdet-tiny: ~100 MB each after a batch of 8). A worker runs
    one batch at a time, so one arena sized for the larger peak serves both; ONNX Runtime's arena is
    thread-safe for processes that do run sessions side by side (the inline pool). Measured on the
    2-core VM (2026-12-03): two sessions after batches of 1 and 8 at both widths, 322 -> 208-226 MB of
    anonymous memory, per-image times within the run-to-run noise."""
    global _shared_cpu_arena
    if _shared_cpu_arena is None:
        import onnxruntime as ort

        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _shared_cpu_arena = True
        except Exception as exc:  # noqa: BLE001 - an older or unusual build: per-session arenas, as before
            log.warning("ONNX Runtime: no shared CPU arena (%s: %s); each session keeps its own",
                        type(exc).__name__, exc)
            _shared_cpu_arena = False
    return _shared_cpu_arena


def _session_options(threads: int, shared_arena: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # workers are processes; nested parallelism only oversubscribes
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores other workers need while this one waits for a batch.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def trt_profile_options(cfg: ModelConfig, input_name: str) -> dict[str, str]:
    """TensorRT optimisation profile: batch min 1, opt and max = the model's max batch size; spatial axes
    as the model's transform makes them.

    The scheduler fills batches up to max_batch_size under load, which is where speed matters, so
    TensorRT tunes its kernels for the full batch. A square model (RTMDet's letterbox) has one input
    size. A keep-ratio model (`resize_scale = [long, short]`, the two-stage families) gets every padded
    shape its resize can produce, in both orientations: either side may be the long one (max long x long,
    each rounded up to the pad), the short side of an elongated image can shrink to one pad step (min),
    and TensorRT tunes for the common landscape photo (opt short x long).
    """
    max_batch = cfg.batch.max_batch_size
    if cfg.resize_scale:
        long_edge = padded_shape([(max(cfg.resize_scale), max(cfg.resize_scale))])[0]
        short_edge = padded_shape([(min(cfg.resize_scale), min(cfg.resize_scale))])[0]
        low, opt, high = (PAD_DIVISOR, PAD_DIVISOR), (short_edge, long_edge), (long_edge, long_edge)
    else:
        low = opt = high = (cfg.input_size, cfg.input_size)

    def shape(n: int, hw: tuple[int, int]) -> str:
        return f"{input_name}:{n}x3x{hw[0]}x{hw[1]}"

    return {"trt_profile_min_shapes": shape(1, low), "trt_profile_opt_shapes": shape(max_batch, opt),
            "trt_profile_max_shapes": shape(max_batch, high)}


def providers_summary() -> dict[str, str | None]:
    """For `detserve doctor`: each ORT provider -> why it cannot run here (None: it can)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out: dict[str, str | None] = {}
    for key, name in PROVIDER_NAMES.items():
        out[name] = "not in this onnxruntime build" if name not in available else provider_problem(key, "cuda:0" if key != "cpu" else "cpu")
    return out

