"""backend = "auto": the cache key, the provider decision (providers faked), and on the bundled rtmdet
the first-load export, reuse, the parity gate, the eager fallback seen through the management API,
and a read-only model store."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fakes import running_engine
from service.backends import auto
from service.bench.setup import toml_dumps
from service.backends.auto import CPU, Candidate, Verdict, cache_key, candidates_for, choose
from service.pipeline.predictor import Predictor
from service.settings import BackendKind, ModelConfig, ServerSettings, load_model_config

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "rtmdet"
ALL_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
VERSIONS = {"torch": "2.14.1", "onnxruntime": "1.31.1"}


def cfg(**fields) -> ModelConfig:
    return ModelConfig(**{"name": "m", "arch": "rtmdet-tiny", "weights": "w.pth", "input_size": 320, **fields})


# --- pure parts ---------------------------------------------------------------------------------


def test_auto_is_the_default_backend_and_explicit_ones_stay():
    assert cfg().backend == BackendKind.AUTO
    assert cfg(backend="eager").backend == BackendKind.EAGER
    assert cfg(backend="onnxruntime").backend == BackendKind.ONNXRUNTIME


def test_cache_key_changes_with_weights_size_settings_and_versions():
    base = cache_key(cfg(), 5, weights_sha256="a" * 64, versions=VERSIONS)
    assert base == cache_key(cfg(), 5, weights_sha256="a" * 64, versions=VERSIONS)
    variants = [
        cache_key(cfg(), 5, weights_sha256="b" * 64, versions=VERSIONS),
        cache_key(cfg(input_size=640), 5, weights_sha256="a" * 64, versions=VERSIONS),
        cache_key(cfg(arch="rtmdet-s"), 5, weights_sha256="a" * 64, versions=VERSIONS),
        cache_key(cfg(), 80, weights_sha256="a" * 64, versions=VERSIONS),
        cache_key(cfg(), 5, weights_sha256="a" * 64, versions={**VERSIONS, "torch": "2.15.0"}),
        cache_key(cfg(), 5, weights_sha256="a" * 64, versions={**VERSIONS, "onnxruntime": "1.32.0"}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # serving-only fields do not force a re-export
    assert base == cache_key(cfg(default_score_thr=0.5, batch={"max_batch_size": 4}), 5,
                             weights_sha256="a" * 64, versions=VERSIONS)


def test_a_verdict_is_measured_again_under_other_nms_or_another_keep_ratio_scale():
    from service.backends.auto import settings_tag

    two_stage = dict(arch="faster-rcnn-r50-fpn", resize_scale=(1333, 800))
    tags = {settings_tag(cfg()), settings_tag(cfg(test_cfg={"iou_threshold": 0.5})), settings_tag(cfg(**two_stage)),
            settings_tag(cfg(**{**two_stage, "resize_scale": (640, 384)}))}
    assert len(tags) == 4
    # one graph takes every padded shape, so the scale changes the check, not the export
    assert cache_key(cfg(**two_stage), 5, weights_sha256="a" * 64, versions=VERSIONS) == cache_key(
        cfg(arch="faster-rcnn-r50-fpn", resize_scale=(640, 384)), 5, weights_sha256="a" * 64, versions=VERSIONS)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DETSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert auto.cache_root() == tmp_path / "xdg" / "detserve"
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path / "env"))
    assert auto.cache_root() == tmp_path / "env"
    assert auto.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert ServerSettings().cache_dir == tmp_path / "env"


def test_cpu_device_tries_the_cpu_provider_only():
    assert candidates_for("cpu", ALL_PROVIDERS, lambda p, d: None) == ([CPU], [])


def test_cuda_order_is_tensorrt_fp16_then_fp32_then_cuda():
    cands, skipped = candidates_for("cuda:0", ALL_PROVIDERS, lambda p, d: None)
    assert [c.label for c in cands] == ["tensorrt-fp16", "tensorrt-fp32", "cuda"] and not skipped
    assert cands[0].trt_fp16 and not cands[1].trt_fp16


def test_cuda_skips_what_cannot_run_and_says_why():
    no_trt = lambda p, d: "TensorRT libraries are not installed" if p == "tensorrt" else None  # noqa: E731
    cands, skipped = candidates_for("cuda:0", ALL_PROVIDERS, no_trt)
    assert [c.label for c in cands] == ["cuda"]
    assert skipped == ["tensorrt: TensorRT libraries are not installed"]
    cands, skipped = candidates_for("cuda:1", ["CPUExecutionProvider"], lambda p, d: None)
    assert cands == [] and skipped == ["tensorrt: not in this onnxruntime build", "cuda: not in this onnxruntime build"]
    cand, reason = choose([], skipped)
    assert cand is None and reason.startswith("auto: eager, because tensorrt: not in this onnxruntime build")


def test_choose_takes_the_first_passing_candidate_else_eager_with_every_reason():
    fp16, fp32, cuda = auto.CUDA_ORDER
    fail16 = Verdict("tensorrt-fp16", False, "FAIL: 9/10 matched")
    pass32 = Verdict("tensorrt-fp32", True, "PASS: 10/10 matched")
    cand, reason = choose([(fp16, fail16), (fp32, pass32)], [])
    assert cand == fp32 and reason == "auto: onnxruntime tensorrt-fp32 (PASS: 10/10 matched)"
    cand, reason = choose([(fp16, fail16), (cuda, Verdict("cuda", False, "ONNX Runtime cuda failed: boom"))], [])
    assert cand is None and "tensorrt-fp16: FAIL: 9/10 matched" in reason and "cuda: ONNX Runtime cuda failed" in reason


def test_onnx_cfg_pins_one_provider_and_keeps_trt_cache_out_of_the_model_folder(tmp_path):
    c = auto.onnx_cfg(cfg(root=tmp_path / "model"), tmp_path / "cache" / "model.onnx", Candidate("tensorrt-fp16", "tensorrt", True),
                      tmp_path / "cache")
    assert c.backend == BackendKind.ONNXRUNTIME and c.onnxruntime.providers == ["tensorrt"] and c.onnxruntime.trt_fp16
    assert c.path(c.onnxruntime.trt_cache_dir) == (tmp_path / "cache" / "trt-tensorrt-fp16").resolve()
    assert c.path(c.onnxruntime.model) == (tmp_path / "cache" / "model.onnx").resolve()


# --- the bundled rtmdet, for real ---------------------------------------------------------------

pytestmark_real = pytest.mark.skipif(not (BUNDLED / "weights.pth").is_file(), reason="models/rtmdet not shipped")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A read-only copy of the bundled rtmdet (as the Docker image and Kubernetes mount it)."""
    root = tmp_path_factory.mktemp("auto-store")
    folder = root / "rtmdet"
    shutil.copytree(BUNDLED, folder, ignore=shutil.ignore_patterns("*.onnx", "trt_cache"))
    for path in (folder, *folder.iterdir()):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield root
    folder.chmod(0o755)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("auto-cache")


@pytest.fixture(scope="module")
def first_load(store, cache):
    """The first load: exports and checks parity (once for the module; later tests reuse the cache)."""
    handler = _Capture()
    logger = logging.getLogger("service.backends.auto")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DETSERVE_CACHE_DIR", str(cache))
            predictor = Predictor.from_config(load_model_config(store / "rtmdet"), device="cpu", threads=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    predictor.close()
    return predictor, handler.text()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines)


def load(store: Path, cache: Path, monkeypatch, caplog, **overrides) -> Predictor:
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(cache))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.backends.auto"):
        predictor = Predictor.from_config(load_model_config(store / "rtmdet", **overrides), device="cpu", threads=1)
    predictor.close()
    return predictor


@pytestmark_real
def test_first_load_exports_once_checks_parity_and_serves_onnxruntime(first_load, store, cache):
    predictor, log_text = first_load
    assert predictor.backend_name == "onnxruntime" and predictor.cfg.backend == BackendKind.ONNXRUNTIME
    assert predictor.backend_reason.startswith("auto: onnxruntime cpu (PASS: ")
    assert "exporting ONNX for backend auto (first start; cached in" in log_text and "parity PASS" in log_text
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()
    verdict = json.loads(next(entries[0].glob("verdict-cpu-*.json")).read_text())
    assert verdict["passed"] and verdict["export_s"] > 0 and verdict["onnx_sha256"]
    # the read-only model folder is untouched
    assert sorted(p.name for p in (store / "rtmdet").iterdir()) == sorted(
        p.name for p in BUNDLED.iterdir() if p.suffix != ".onnx" and p.name != "trt_cache")


@pytestmark_real
def test_second_load_reuses_the_cache_without_exporting(first_load, store, cache, monkeypatch, caplog):
    onnx = next(cache.iterdir()) / "model.onnx"
    mtime = onnx.stat().st_mtime_ns
    predictor = load(store, cache, monkeypatch, caplog)
    assert predictor.backend_name == "onnxruntime"
    assert "reuses the cached cpu verdict" in caplog.text and "exporting" not in caplog.text
    assert onnx.stat().st_mtime_ns == mtime


@pytestmark_real
def test_a_failing_parity_check_serves_eager_and_is_not_retried(first_load, store, cache, monkeypatch, caplog):
    # Other NMS settings: the same graph (no export) gets its own verdict; an impossible bound fails it.
    monkeypatch.setattr(auto, "PARITY_MAX_BOX_PX", -1.0)
    predictor = load(store, cache, monkeypatch, caplog, test_cfg={"iou_threshold": 0.6})
    assert predictor.backend_name == "eager" and predictor.cfg.backend == BackendKind.EAGER
    assert predictor.backend_reason.startswith("auto: eager, because cpu: FAIL: ")
    assert "exporting" not in caplog.text
    monkeypatch.setattr(auto, "PARITY_MAX_BOX_PX", 0.5)
    again = load(store, cache, monkeypatch, caplog, test_cfg={"iou_threshold": 0.6})
    assert again.backend_name == "eager" and "reuses the cached cpu verdict" in caplog.text and "(FAIL)" in caplog.text


@pytestmark_real
def test_a_parity_check_short_of_memory_serves_eager_and_is_tried_again_next_start(first_load, store, cache,
                                                                                  monkeypatch, caplog):
    import torch

    from service.export import parity

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(parity, "parity_results", out_of_memory)
    predictor = load(store, cache, monkeypatch, caplog, test_cfg={"iou_threshold": 0.55})
    assert predictor.backend_name == "eager" and "OutOfMemoryError" in predictor.backend_reason
    monkeypatch.undo()
    again = load(store, cache, monkeypatch, caplog, test_cfg={"iou_threshold": 0.55})
    assert again.backend_name == "onnxruntime" and "reuses the cached" not in caplog.text


@pytestmark_real
def test_a_corrupted_cached_graph_is_not_used(first_load, store, cache, monkeypatch, caplog):
    onnx = next(cache.iterdir()) / "model.onnx"
    onnx.write_bytes(b"not an onnx graph")
    predictor = load(store, cache, monkeypatch, caplog)
    # the verdict was about another file: export again, check again, then serve the new graph
    assert "exporting ONNX" in caplog.text and "parity PASS" in caplog.text
    assert predictor.backend_name == "onnxruntime" and onnx.stat().st_size > 1_000_000


@pytestmark_real
def test_an_unwritable_cache_serves_eager_with_the_reason(first_load, store, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"  # a folder cannot be made under a file, even by root
    blocker.write_text("x")
    predictor = load(store, blocker / "cache", monkeypatch, caplog)
    assert predictor.backend_name == "eager" and "cache folder is not writable" in predictor.backend_reason
    assert "DETSERVE_CACHE_DIR" in predictor.backend_reason


@pytestmark_real
def test_eager_fallback_reason_is_in_the_management_describe(first_load, store, cache, monkeypatch):
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(cache))
    monkeypatch.setattr(auto, "PARITY_MAX_SCORE", -1.0)  # inline workers run in this process
    for verdict in next(cache.iterdir()).glob("verdict-*.json"):
        verdict.unlink()  # decide again (the graph stays: no export)

    async def describe():
        async with running_engine(store, inline=True, factory=None, models=["rtmdet"]) as engine:
            app = auto_management_app(engine)
            with TestClient(app) as client:
                return client.get("/models/rtmdet").json()

    body = asyncio.run(asyncio.wait_for(describe(), 120))
    entry = body[0] if isinstance(body, list) else body
    assert entry["backend"] == "eager"
    assert entry["backendReason"].startswith("auto: eager, because cpu: FAIL: ")


def auto_management_app(engine):
    from service.protocols.rest.app import build_management_app

    return build_management_app(engine, ServerSettings())


def test_entry_lock_makes_a_second_holder_wait(tmp_path):
    import threading
    import time

    order: list[str] = []
    inside = threading.Event()

    def first():
        with auto.entry_lock(tmp_path / "entry"):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with auto.entry_lock(tmp_path / "entry"):  # flock: a separate open file waits, even in-process
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "verdict.json"
    auto.write_atomic(target, '{"passed": true}')
    auto.write_atomic(target, '{"passed": false}')
    assert json.loads(target.read_text()) == {"passed": False}
    assert [p.name for p in tmp_path.iterdir()] == ["verdict.json"]


@pytest.mark.slow
@pytestmark_real
def test_two_workers_of_one_model_export_once(store, tmp_path, monkeypatch, capfd):
    """Real worker processes on a fresh cache: one exports, the other waits on the lock and reuses."""
    monkeypatch.setenv("DETSERVE_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(store / "rtmdet", tmp_path / "store" / "rtmdet")
    (tmp_path / "store" / "rtmdet").chmod(0o755)
    (tmp_path / "store" / "rtmdet" / "model.toml").chmod(0o644)
    toml = tmp_path / "store" / "rtmdet" / "model.toml"
    data = tomllib.loads(toml.read_text())
    toml.write_text(toml_dumps({**data, "workers": {**data.get("workers", {}), "count": 2, "threads": 1}}))

    async def scenario():
        async with running_engine(tmp_path / "store", inline=False, factory=None, worker_start_timeout_s=240) as engine:
            info = engine.model_info("rtmdet")
            return info.backend, info.backend_reason, len(info.workers)

    backend, reason, workers = asyncio.run(asyncio.wait_for(scenario(), 300))
    worker_logs = capfd.readouterr().err  # the spawned workers inherit this stderr
    assert worker_logs.count("exporting ONNX for backend auto") == 1, worker_logs[-3000:]
    assert worker_logs.count("parity PASS") == 1 and "reuses the cached cpu verdict" in worker_logs
    assert (backend, workers) == ("onnxruntime", 2) and reason.startswith("auto: onnxruntime cpu (PASS")
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and len(list(entries[0].glob("verdict-cpu-*.json"))) == 1
    assert not list(entries[0].glob(".*.tmp"))


@pytestmark_real
def test_a_session_on_another_provider_than_the_verdict_serves_eager(first_load, store, cache, monkeypatch, caplog):
    # A verdict for the CUDA provider, but ONNX Runtime here can only run the CPU one: not what passed.
    entry = next(cache.iterdir())
    cuda = auto.onnx_cfg(load_model_config(store / "rtmdet"), entry / "model.onnx", Candidate("cuda", "cuda"), entry)
    monkeypatch.setattr(auto, "resolve_auto", lambda cfg, device, **_: auto.AutoChoice(cuda, "auto: onnxruntime cuda (PASS)"))
    predictor = load(store, cache, monkeypatch, caplog)
    assert predictor.backend_name == "eager"
    assert "instead of CUDAExecutionProvider" in predictor.backend_reason


def test_a_failing_export_is_recorded_and_not_retried(tmp_path, monkeypatch):
    from service.detectors.checkpoint import Checkpoint

    calls = []

    def broken_export(cfg, checkpoint, onnx_path):
        calls.append(onnx_path)
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(auto, "_export", broken_export)
    monkeypatch.setattr(auto, "cache_key", lambda cfg, n: "k" * 64)
    checkpoint = Checkpoint({}, ("a", "b"))
    for _ in range(2):
        choice = auto.resolve_auto(cfg(root=tmp_path), "cpu", checkpoint=checkpoint, root=tmp_path / "cache")
        assert choice.backend == BackendKind.EAGER
        assert choice.reason == "auto: eager, because cpu: ONNX export failed: RuntimeError: unsupported operator"
    assert len(calls) == 1  # the second start read the stored verdict


def test_the_cache_key_covers_the_code_that_exports_and_checks_graphs(monkeypatch):
    """An upgraded image that keeps its cache volume must export again: detserve's own sources are keyed."""
    from service.backends import auto

    first = auto.library_versions()
    assert first["detserve_code"] == auto.code_fingerprint() and len(first["detserve_code"]) == 16
    auto.code_fingerprint.cache_clear()
    real_sha256 = auto.hashlib.sha256
    monkeypatch.setattr(auto.hashlib, "sha256", lambda *a: real_sha256(b"other code"))
    try:
        assert auto.code_fingerprint() != first["detserve_code"]
    finally:
        auto.code_fingerprint.cache_clear()


@pytestmark_real
def test_a_read_only_cache_with_a_passing_verdict_serves_onnxruntime(first_load, store, cache, monkeypatch, caplog):
    # Root may write anywhere, so "read-only" is what os.access says of the entry (as on a ro mount).
    entry = next(cache.iterdir())
    for verdict in entry.glob("verdict-*.json"):
        verdict.unlink()  # earlier tests leave FAIL verdicts: decide again, writable (no export)
    assert load(store, cache, monkeypatch, caplog).backend_name == "onnxruntime"
    real_access = os.access
    monkeypatch.setattr(auto.os, "access", lambda path, mode: False if mode == os.W_OK and Path(path) == entry
                        else real_access(path, mode))
    onnx = entry / "model.onnx"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in entry.iterdir())
    predictor = load(store, cache, monkeypatch, caplog)
    assert predictor.backend_name == "onnxruntime" and predictor.backend_reason.startswith("auto: onnxruntime cpu (PASS")
    assert "read-only cache" in caplog.text and "exporting" not in caplog.text
    assert sorted((p.name, p.stat().st_mtime_ns) for p in entry.iterdir()) == before  # nothing written

    # A verdict about another graph than the one on disk is not trusted, and cannot be renewed: eager.
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    try:
        stale = load(store, cache, monkeypatch, caplog)
        assert stale.backend_name == "eager" and "is read-only and holds no current cpu verdict" in stale.backend_reason
    finally:
        onnx.write_bytes(onnx.read_bytes()[:-1])
