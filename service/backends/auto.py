"""`backend = "auto"`: resolved in the worker at load time, never in the front process.

On CPU the choice is ONNX Runtime's CPU EP; on CUDA, TensorRT EP in fp16, TensorRT in fp32, CUDA EP,
in that order. A candidate is used only when an exported graph passes the parity gate against eager
on the same device (every eager detection matched, boxes <= 0.5 px, scores <= 1e-3); otherwise the
model is served eager and the reason travels to the management API.

The first load exports the network-only graph (service/export/onnx_export.py) into a cache folder
keyed by what the graph depends on (weights, input size, export settings, torch and onnxruntime
versions), and stores each candidate's parity verdict beside it, so a failing export is not retried
on every start. The model folder is never written: model stores are mounted read-only.
"""
from __future__ import annotations

import contextlib
import functools
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import is_cuda_out_of_memory
from ..settings import BackendKind, ModelConfig

log = logging.getLogger(__name__)


def _visible_progress() -> None:
    """Worker processes configure no logging (only warnings would reach stderr): give auto's
    progress lines (export, verdict, reuse) a stderr handler of their own there."""
    if logging.getLogger().handlers or log.handlers:
        return  # the server, the CLI or pytest routes records already
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s detserve worker %(process)d: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

# Set by a worker process (service/engine/worker.py) to report long load stages to the pool.
progress_hook: Callable[[str], None] | None = None


def _progress(stage: str) -> None:
    if progress_hook is not None:
        progress_hook(stage)


CACHE_ENV = "DETSERVE_CACHE_DIR"
# Bump when the cached layout or what the export writes changes, so old entries are not reused.
CACHE_FORMAT = 1
EXPORT_OPSET = 17
EXPORT_END2END = False  # network-only: the graph feeds the same postprocessing eager uses
ONNX_FILE = "model.onnx"
# The parity gate (issue 14): the bounds of service/export/parity.py's acceptance report.
PARITY_MAX_BOX_PX = 0.5
PARITY_MAX_SCORE = 1e-3
PARITY_SCORE_THR = 0.3
PARITY_IMAGES = 8
EXPORT_FAILED = "ONNX export failed"


@dataclass(frozen=True)
class Candidate:
    """One ONNX Runtime configuration auto may choose."""

    label: str  # "tensorrt-fp16" | "tensorrt-fp32" | "cuda" | "cpu": also the verdict's file name
    provider: str  # key of settings.OnnxRuntimeConfig.providers
    trt_fp16: bool = False


CPU = Candidate("cpu", "cpu")
CUDA_ORDER = (Candidate("tensorrt-fp16", "tensorrt", True), Candidate("tensorrt-fp32", "tensorrt"),
              Candidate("cuda", "cuda"))


@dataclass(frozen=True)
class Verdict:
    """A candidate's parity result, as stored in the cache."""

    candidate: str
    passed: bool
    summary: str  # the parity report's one line, or why export / session creation failed
    onnx_sha256: str = ""  # the graph the verdict is about; a changed file invalidates it
    export_s: float = 0.0
    parity_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def from_file(cls, path: Path) -> "Verdict | None":
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError, KeyError):
            return None  # missing or half-written by a crashed process: decide again


@dataclass(frozen=True)
class AutoChoice:
    """What auto resolved to: the config to build the backend from, and why, in one line."""

    cfg: ModelConfig  # backend EAGER or ONNXRUNTIME (never AUTO)
    reason: str

    @property
    def backend(self) -> BackendKind:
        return self.cfg.backend


# --- where and under which key --------------------------------------------------------------


def cache_root(explicit: str | Path | None = None) -> Path:
    """The cache folder: explicit, else $DETSERVE_CACHE_DIR, else $XDG_CACHE_HOME/detserve, else ~/.cache/detserve."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "detserve"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "detserve_code": code_fingerprint()}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the sources a graph and its verdict depend on (detectors, export, pipeline, backends):
    an upgraded image with a kept cache volume must not reuse a graph that older code exported."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in ("detectors", "export", "pipeline", "backends"):
        for source in sorted((package / folder).rglob("*.py")):
            digest.update(str(source.relative_to(package)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(cfg: ModelConfig, num_classes: int, *, weights_sha256: str | None = None,
              versions: dict[str, str] | None = None) -> str:
    """sha256 over everything the exported graph depends on; any change means a new export."""
    if weights_sha256 is None:
        weights_sha256 = file_sha256(cfg.path(cfg.weights or ""))
    fields = {
        "format": CACHE_FORMAT,
        "weights_sha256": weights_sha256,
        "arch": cfg.arch,
        "num_classes": int(num_classes),
        "input_size": cfg.input_size,
        "opset": EXPORT_OPSET,
        "end2end": EXPORT_END2END,
        **(versions if versions is not None else library_versions()),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def settings_tag(cfg: ModelConfig) -> str:
    """The settings a verdict was measured under (same graph, different NMS or keep-ratio scale: re-check)."""
    text = cfg.test_cfg.model_dump_json()
    if cfg.resize_scale:  # a two-stage graph takes any padded shape; its parity depends on which one
        text += json.dumps(list(cfg.resize_scale))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def entry_dir(cfg: ModelConfig, key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{cfg.name}-{key[:20]}"


def verdict_path(entry: Path, candidate: Candidate, cfg: ModelConfig) -> Path:
    return entry / f"verdict-{candidate.label}-{settings_tag(cfg)}.json"


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Exclusive lock over one cache entry: concurrent workers of a model wait, then reuse."""
    entry.mkdir(parents=True, exist_ok=True)
    lock = entry / ".lock"
    lock.touch(exist_ok=True)
    with open(lock, "rb") as handle:  # flock needs no write access: a lock file of another user works
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # a cache shared by several users or containers stays readable
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- the decision -----------------------------------------------------------------------------


ProblemFn = Callable[[str, str], "str | None"]


def candidates_for(device: str, available: list[str], problem: ProblemFn) -> tuple[list[Candidate], list[str]]:
    """Candidates to try on `device`, best first, and why the others were skipped.

    `available` is onnxruntime.get_available_providers(); `problem(provider, device)` says why a
    provider cannot run (service.backends.onnxrt.provider_problem). Both are injected for tests.
    """
    from .onnxrt import PROVIDER_NAMES

    if not device.startswith("cuda"):
        return ([CPU], []) if PROVIDER_NAMES["cpu"] in available else ([], ["onnxruntime has no CPU provider"])
    chosen, skipped = [], []
    for cand in CUDA_ORDER:
        name = PROVIDER_NAMES[cand.provider]
        why = "not in this onnxruntime build" if name not in available else problem(cand.provider, device)
        if why is None:
            chosen.append(cand)
        elif not any(cand.provider in s for s in skipped):
            skipped.append(f"{cand.provider}: {why}")
    return chosen, skipped


def choose(verdicts: list[tuple[Candidate, Verdict]], skipped: list[str]) -> tuple[Candidate | None, str]:
    """The first candidate whose verdict passed, else None; with the reason line either way."""
    for cand, verdict in verdicts:
        if verdict.passed:
            return cand, f"auto: onnxruntime {cand.label} ({verdict.summary})"
    failed = [f"{cand.label}: {verdict.summary}" for cand, verdict in verdicts]
    return None, "auto: eager, because " + "; ".join(failed + skipped or ["no ONNX Runtime candidate"])


def onnx_cfg(cfg: ModelConfig, onnx_path: Path, cand: Candidate, entry: Path) -> ModelConfig:
    """`cfg` served by ONNX Runtime on the cached graph with exactly one candidate's provider."""
    ort = cfg.onnxruntime.model_copy(update={
        "model": str(onnx_path), "end2end": EXPORT_END2END, "providers": [cand.provider],
        "trt_fp16": cand.trt_fp16, "trt_cache_dir": str(entry / f"trt-{cand.label}"),
    })
    return cfg.model_copy(update={"backend": BackendKind.ONNXRUNTIME, "onnxruntime": ort})


def eager_cfg(cfg: ModelConfig) -> ModelConfig:
    return cfg.model_copy(update={"backend": BackendKind.EAGER})


def resolve_auto(cfg: ModelConfig, device: str, *, checkpoint, threads: int | None = None,
                 root: Path | None = None) -> AutoChoice:
    """Decide eager vs ONNX Runtime for `cfg` on `device`, exporting and checking parity if not cached.

    `checkpoint` is the already-read service.detectors.checkpoint.Checkpoint. Never raises for an
    export or parity failure: those become an eager choice with the reason.
    """
    import onnxruntime as ort

    from ..detectors.checkpoint import num_classes_in
    from .onnxrt import provider_problem

    _visible_progress()
    cands, skipped = candidates_for(device, ort.get_available_providers(), provider_problem)
    if not cands:
        return _eager(cfg, choose([], skipped)[1])
    num_classes = num_classes_in(checkpoint.state_dict, cfg.arch) or len(checkpoint.classes or ())
    entry = entry_dir(cfg, cache_key(cfg, num_classes), root)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        writable = os.access(entry, os.W_OK)
    except OSError as exc:
        return _eager(cfg, f"auto: eager, because the cache folder is not writable ({exc}); "
                           f"set {CACHE_ENV} to a writable folder")
    if not writable:
        return _read_only_choice(cfg, cands, skipped, entry)
    verdicts = []
    try:
        with entry_lock(entry):
            for cand in cands:
                verdict = candidate_verdict(cfg, device, cand, entry, checkpoint, threads)
                verdicts.append((cand, verdict))
                if verdict.passed or verdict.summary.startswith(EXPORT_FAILED):
                    break  # a failed export fails every candidate: do not export again for the next one
    except OSError as exc:  # a full disk, a lock or verdict file we may not touch: serve, just not from the cache
        return _eager(cfg, f"auto: eager, because the cache folder {entry} failed: {type(exc).__name__}: {exc}")
    cand, reason = choose(verdicts, skipped)
    if cand is None:
        return _eager(cfg, reason)
    log.info("model %s: %s", cfg.name, reason)
    return AutoChoice(onnx_cfg(cfg, entry / ONNX_FILE, cand, entry), reason)


def _read_only_choice(cfg: ModelConfig, cands: list[Candidate], skipped: list[str], entry: Path) -> AutoChoice:
    """A cache filled once and then mounted read-only (baked into an image, a shared volume) still
    serves what it decided: a PASS verdict about the graph on disk is used as is. Nothing is
    exported, locked or written; without a usable verdict the model is served eager."""
    onnx_path = entry / ONNX_FILE
    current = file_sha256(onnx_path) if onnx_path.is_file() else ""
    verdicts = []
    for cand in cands:
        verdict = Verdict.from_file(verdict_path(entry, cand, cfg))
        if verdict is None or (verdict.passed and verdict.onnx_sha256 != current):
            return _eager(cfg, f"auto: eager, because the cache folder {entry} is read-only and holds no "
                               f"current {cand.label} verdict; set {CACHE_ENV} to a writable folder")
        verdicts.append((cand, verdict))
        if verdict.passed:
            break
    cand, reason = choose(verdicts, skipped)
    if cand is None:
        return _eager(cfg, reason)
    log.info("model %s: %s (read-only cache %s)", cfg.name, reason, entry)
    return AutoChoice(onnx_cfg(cfg, onnx_path, cand, entry), reason)


def _eager(cfg: ModelConfig, reason: str) -> AutoChoice:
    log.warning("model %s: %s", cfg.name, reason)
    return AutoChoice(eager_cfg(cfg), reason)


def candidate_verdict(cfg: ModelConfig, device: str, cand: Candidate, entry: Path, checkpoint, threads=None) -> Verdict:
    """The cached verdict when it is about the graph on disk, else a fresh export and/or parity run."""
    onnx_path = entry / ONNX_FILE
    path = verdict_path(entry, cand, cfg)
    cached = Verdict.from_file(path)
    current = file_sha256(onnx_path) if onnx_path.is_file() else ""
    if cached is not None and (not cached.passed or cached.onnx_sha256 == current):
        log.info("model %s: backend auto reuses the cached %s verdict in %s (%s)", cfg.name, cand.label, entry,
                 "PASS" if cached.passed else "FAIL")
        return cached
    export_s = 0.0
    if cached is not None or not current:
        # First start, or the cached graph changed under a passing verdict: export (again).
        log.info("model %s: exporting ONNX for backend auto (first start; cached in %s)", cfg.name, entry)
        _progress("exporting ONNX")
        start = time.perf_counter()
        try:
            _export(cfg, checkpoint, onnx_path)
        except Exception as exc:  # noqa: BLE001 - any exporter failure means "serve eager"
            verdict = Verdict(cand.label, False, f"{EXPORT_FAILED}: {type(exc).__name__}: {exc}",
                              export_s=time.perf_counter() - start)
            if not isinstance(exc, (OSError, MemoryError)):  # a full disk or memory may pass next start
                write_atomic(path, verdict.to_json())
            return verdict
        export_s = time.perf_counter() - start
        current = file_sha256(onnx_path)
    start = time.perf_counter()
    _progress(f"checking {cand.label} parity")
    summary, passed, lasting = _parity(cfg, device, cand, entry, onnx_path, threads)
    verdict = Verdict(cand.label, passed, summary, current, round(export_s, 2), round(time.perf_counter() - start, 2))
    # info even on FAIL: the fallback to eager is the one warning that says why
    log.info("model %s: backend auto %s parity %s (export %.1f s, parity %.1f s)",
             cfg.name, cand.label, summary, verdict.export_s, verdict.parity_s)
    if lasting:
        write_atomic(path, verdict.to_json())
    return verdict


def _export(cfg: ModelConfig, checkpoint, onnx_path: Path) -> None:
    from ..detectors.base import get_detector
    from ..detectors.checkpoint import load_weights
    from ..export.onnx_export import export_onnx
    from ..pipeline.predictor import resolve_classes

    classes = resolve_classes(cfg, checkpoint.classes)
    detector = get_detector(cfg.arch)
    model = detector.build(detector.num_classes_in(checkpoint.state_dict) or len(classes))
    load_weights(model, checkpoint, strict=True)
    # Not BN-folded first: the TorchScript exporter already folds eval-mode BN into the convs
    # (rtmdet-tiny's graph has 86 Conv and no BatchNormalization node), so the graph would be the same.
    model.eval().requires_grad_(False)
    tmp = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.tmp")
    try:
        export_onnx(cfg, end2end=EXPORT_END2END, opset=EXPORT_OPSET, out=tmp, model=model, classes=classes)
        os.replace(tmp, onnx_path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _parity(cfg: ModelConfig, device: str, cand: Candidate, entry: Path, onnx_path: Path,
            threads) -> tuple[str, bool, bool]:
    """(summary, passed, lasting): a failure for want of memory (the GPU shared with a running
    server, say) may pass at the next start, so its verdict is not cached."""
    from ..export.parity import parity_results, compare_results, shape_images

    try:
        reference, candidate = parity_results(
            eager_cfg(cfg), onnx_cfg(cfg, onnx_path, cand, entry), shape_images(PARITY_IMAGES), device=device,
            threads=threads)
    except Exception as exc:  # noqa: BLE001 - a session that cannot load or run is a failed candidate
        short_of_memory = isinstance(exc, MemoryError) or is_cuda_out_of_memory(exc)
        return f"ONNX Runtime {cand.label} failed: {type(exc).__name__}: {exc}", False, not short_of_memory
    report = compare_results(reference, candidate, PARITY_SCORE_THR)
    if report.reference == 0:
        # No detection above the serving threshold on shape images (e.g. a COCO model): compare the
        # low-score ones instead of passing on nothing.
        report = compare_results(reference, candidate, cfg.test_cfg.score_thr)
    passed = report.reference > 0 and report.ok(PARITY_MAX_BOX_PX, PARITY_MAX_SCORE)
    summary = (f"{'PASS' if passed else 'FAIL'}: {report.matched}/{report.reference} eager detections "
               f"(score >= {report.score_thr:g}) matched, box diff max {report.max_box_diff:.4f} px, "
               f"score diff max {report.max_score_diff:.1e}; bounds {PARITY_MAX_BOX_PX} px, {PARITY_MAX_SCORE:g}")
    return summary, passed, True


# --- reporting without deciding (doctor, export) ---------------------------------------------


def describe_plan(cfg: ModelConfig, device: str, root: Path | None = None) -> str:
    """What auto chooses (or would choose on first load) for `cfg` on `device`, and why; exports nothing."""
    import onnxruntime as ort

    from ..detectors.checkpoint import load_checkpoint, num_classes_in
    from .onnxrt import provider_problem

    if cfg.arch == "null":
        return "no network (null arch)"
    if not cfg.weights or not cfg.path(cfg.weights).is_file():
        return "eager: no PyTorch weights to export"
    cands, skipped = candidates_for(device, ort.get_available_providers(), provider_problem)
    if not cands:
        return choose([], skipped)[1]
    checkpoint = load_checkpoint(cfg.path(cfg.weights))
    entry = entry_dir(cfg, cache_key(cfg, num_classes_in(checkpoint.state_dict, cfg.arch) or len(checkpoint.classes or ())), root)
    verdicts = []
    for cand in cands:
        verdict = Verdict.from_file(verdict_path(entry, cand, cfg))
        if verdict is None:
            order = ", then ".join(c.label for c in cands[len(verdicts):])
            return (f"not decided yet: the first load exports to {entry} and checks parity for {order}; "
                    f"onnxruntime with the first that passes, else eager" +
                    (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
        verdicts.append((cand, verdict))
        if verdict.passed:
            break
    return choose(verdicts, skipped)[1] + f" [cached in {entry}]"
