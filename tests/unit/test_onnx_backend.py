"""ONNX Runtime backend: provider choice and fallback on a machine without GPU, session threads,
layout detection by output names, static-batch graphs, clear config errors."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from service.backends import create_backend
from service.backends.base import InputDetections
from service.detectors.rtmdet.outputs import HeadOutputs
from service.backends.onnxrt import OnnxRuntimeBackend, trt_profile_options
from service.detectors.rtmdet.family import network_output_order
from service.errors import ConfigError
from service.settings import ModelConfig

SIZE = 64


def end2end_graph(path: Path, *, batch: int | str = "batch", k: int = 4, masks: bool = False, size: int = SIZE) -> Path:
    """A tiny MMDeploy-layout graph: fixed dets/labels(/masks) broadcast over the batch."""
    dets = np.array([[4, 4, 20, 30, 0.9], [10, 10, 40, 40, 0.6], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)[:k]
    labels = np.array([1, 0, -1, -1], np.int64)[:k]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2, 3], keepdims=0),  # [N]
        helper.make_node("Mul", ["m", "zero"], ["z"]),  # zeros [N] tied to the batch
        helper.make_node("Unsqueeze", ["z", "ax12"], ["z3"]),  # [N, 1, 1]
        helper.make_node("Add", ["z3", "dets_c"], ["dets"]),
        helper.make_node("Cast", ["z3"], ["z3i"], to=TensorProto.INT64),
        helper.make_node("Squeeze", ["z3i", "ax2"], ["z2i"]),
        helper.make_node("Add", ["z2i", "labels_c"], ["labels"]),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("ax12", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("ax2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("dets_c", TensorProto.FLOAT, dets.shape, dets.flatten()),
        helper.make_tensor("labels_c", TensorProto.INT64, labels.shape, labels),
    ]
    outputs = [helper.make_tensor_value_info("dets", TensorProto.FLOAT, [batch, k, 5]),
               helper.make_tensor_value_info("labels", TensorProto.INT64, [batch, k])]
    if masks:
        nodes += [helper.make_node("Unsqueeze", ["z3", "ax3"], ["z4"]),
                  helper.make_node("Add", ["z4", "masks_c"], ["masks"])]
        inits += [helper.make_tensor("ax3", TensorProto.INT64, [1], [3]),
                  helper.make_tensor("masks_c", TensorProto.FLOAT, [k, size, size], np.full(k * size * size, 0.75, np.float32))]
        outputs.append(helper.make_tensor_value_info("masks", TensorProto.FLOAT, [batch, k, size, size]))
    graph = helper.make_graph(nodes, "end2end", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def config(tmp_path: Path, **overrides) -> ModelConfig:
    ort = {"model": "end2end.onnx", "end2end": True, **overrides.pop("onnxruntime", {})}
    return ModelConfig(name="m", arch="rtmdet-tiny", input_size=SIZE, backend="onnxruntime", device="cpu",
                       onnxruntime=ort, root=tmp_path, **overrides)


def test_create_backend_selects_onnxruntime_and_runs_end2end_on_cpu(tmp_path, caplog):
    end2end_graph(tmp_path / "end2end.onnx")
    backend = create_backend(config(tmp_path), "cpu")
    assert isinstance(backend, OnnxRuntimeBackend)
    with caplog.at_level(logging.INFO, logger="service.backends.onnxrt"):
        backend.load()
    assert backend.providers == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in caplog.text  # the provider that really runs is logged
    out = backend.infer(torch.zeros(3, 3, SIZE, SIZE))
    assert isinstance(out, InputDetections)
    assert out.dets.shape == (3, 4, 5) and out.labels.dtype == torch.int64 and out.masks is None
    backend.close()


def test_gpu_providers_skipped_with_a_warning_when_no_gpu(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    end2end_graph(tmp_path / "end2end.onnx")
    backend = OnnxRuntimeBackend(config(tmp_path), "cuda:0")
    with caplog.at_level(logging.WARNING, logger="service.backends.onnxrt"):
        backend.load()
    assert backend.providers == ["CPUExecutionProvider"]
    assert "skipping TensorrtExecutionProvider" in caplog.text and "skipping CUDAExecutionProvider" in caplog.text
    assert "no usable CUDA device" in caplog.text


def test_static_batch_graph_with_masks_runs_any_batch(tmp_path):
    end2end_graph(tmp_path / "end2end.onnx", batch=1, masks=True)
    backend = OnnxRuntimeBackend(config(tmp_path), "cpu")
    backend.load()
    out = backend.infer(torch.zeros(3, 3, SIZE, SIZE))
    assert out.batch_size == 3 and out.masks.shape == (3, 4, SIZE, SIZE)
    assert backend.has_masks and backend.end2end


def test_session_threads_follow_worker_budget(tmp_path):
    end2end_graph(tmp_path / "end2end.onnx")
    assert OnnxRuntimeBackend(config(tmp_path, workers={"threads": 3}), "cpu").threads == 3
    assert OnnxRuntimeBackend(config(tmp_path), "cpu", threads=2).threads == 2
    assert OnnxRuntimeBackend(config(tmp_path, workers={"count": 64}), "cpu").threads == 1


def test_layout_mismatch_follows_the_graph(tmp_path, caplog):
    end2end_graph(tmp_path / "end2end.onnx")
    backend = OnnxRuntimeBackend(config(tmp_path, onnxruntime={"end2end": False}), "cpu")
    with caplog.at_level(logging.WARNING, logger="service.backends.onnxrt"):
        backend.load()
    assert backend.end2end and "following the graph" in caplog.text


def test_missing_file_and_wrong_input_size_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="detserve export m --format onnx"):
        OnnxRuntimeBackend(config(tmp_path), "cpu").load()
    end2end_graph(tmp_path / "end2end.onnx", size=32)
    with pytest.raises(ConfigError, match="input_size"):
        OnnxRuntimeBackend(config(tmp_path), "cpu").load()


def test_network_output_order_by_name():
    shuffled = ["bbox_1", "mask_feat", "cls_0", "kernel_2", "cls_2", "bbox_0", "kernel_0", "cls_1", "bbox_2", "kernel_1"]
    assert network_output_order(shuffled) == [
        "cls_0", "cls_1", "cls_2", "bbox_0", "bbox_1", "bbox_2", "kernel_0", "kernel_1", "kernel_2", "mask_feat"]
    assert network_output_order(["a", "b", "c", "d", "e", "f"]) == ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(ConfigError, match="expected dets/labels"):
        network_output_order(["x", "y"])


def test_network_only_graph_returns_head_outputs(tmp_path):
    from service.detectors.registry import build_detector
    from service.export.onnx_export import export_onnx

    model = build_detector("rtmdet-tiny", 2)
    cfg = config(tmp_path, onnxruntime={"model": "model.onnx", "end2end": False})
    export_onnx(cfg, model=model, classes=("a", "b"))
    backend = OnnxRuntimeBackend(cfg, "cpu")
    backend.load()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = backend.infer(x)
    assert isinstance(out, tuple) and len(out) == 6 and not backend.end2end  # raw tensors, the family names them
    with torch.no_grad():
        ref = HeadOutputs.from_flat(model(x))
    for a, b in zip(HeadOutputs.from_flat(out).flat(), ref.flat()):
        assert torch.allclose(a, b, atol=1e-4)


def test_trt_profile_spans_the_batch_settings(tmp_path):
    cfg = config(tmp_path, batch={"max_batch_size": 16})
    assert trt_profile_options(cfg, "input") == {
        "trt_profile_min_shapes": f"input:1x3x{SIZE}x{SIZE}",
        "trt_profile_opt_shapes": f"input:16x3x{SIZE}x{SIZE}",
        "trt_profile_max_shapes": f"input:16x3x{SIZE}x{SIZE}",
    }


@pytest.mark.parametrize("scale", [(1333, 800), (800, 1333), (666, 400)])
def test_trt_profile_of_a_keep_ratio_model_spans_every_padded_shape_both_ways(tmp_path, scale):
    from service.pipeline.shape_key import padded_shape, rescale_size

    cfg = ModelConfig(name="m", arch="mask-rcnn-r50-fpn", resize_scale=scale, batch={"max_batch_size": 4},
                      root=tmp_path)
    profile = trt_profile_options(cfg, "input")
    long_edge, short_edge = (-(-max(scale) // 32) * 32), (-(-min(scale) // 32) * 32)
    assert profile == {
        "trt_profile_min_shapes": "input:1x3x32x32",
        "trt_profile_opt_shapes": f"input:4x3x{short_edge}x{long_edge}",
        "trt_profile_max_shapes": f"input:4x3x{long_edge}x{long_edge}",
    }

    def dims(key: str) -> list[int]:
        return [int(x) for x in profile[key].split(":")[1].split("x")]

    low, high = dims("trt_profile_min_shapes"), dims("trt_profile_max_shapes")
    # landscape, portrait, square, panoramas both ways, tiny and huge images: every input fits the profile
    for height, width in [(480, 640), (640, 480), (612, 612), (200, 1000), (1000, 200), (20, 4000), (4000, 20),
                          (3000, 4000), (1, 1)]:
        padded = padded_shape([rescale_size(height, width, scale)])
        assert all(lo <= d <= hi for lo, d, hi in zip(low[2:], padded, high[2:])), (height, width, padded)


def test_throughput_eager_vs_onnxruntime(tmp_path):
    from service.detectors.checkpoint import save_checkpoint
    from service.detectors.registry import build_detector
    from service.export.throughput import measure_backend_throughput

    save_checkpoint(tmp_path / "w.pth", build_detector("rtmdet-tiny", 2).state_dict(), ["a", "b"])
    cfg = ModelConfig(name="m", arch="rtmdet-tiny", weights="w.pth", input_size=SIZE, device="cpu", root=tmp_path)
    for backend in ("eager", "onnxruntime"):
        assert measure_backend_throughput(cfg, backend, batch_size=2, seconds=0.2, warmup=1) > 0
    assert not (tmp_path / "model.onnx").exists()  # the model folder is left alone


@pytest.mark.parametrize("cores, workers, configured, expected", [
    (2, 1, 0, 2), (4, 1, 0, 4), (8, 2, 0, 4), (2, 2, 0, 1), (1, 1, 0, 1), (16, 3, 0, 5), (2, 1, 1, 1), (3, 4, 0, 1),
])
def test_one_thread_rule_for_the_engine_and_a_backend_built_alone(monkeypatch, cores, workers, configured, expected):
    """The cores split between workers (at least one each), unless workers.threads is set."""
    from service.backends.onnxrt import default_threads
    from service.engine.pool import threads_per_worker
    from service.settings import WorkerConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("service.settings._cgroup_quota", lambda root: None)
    workers_cfg = WorkerConfig(count=workers, threads=configured)
    cfg = SimpleNamespace(workers=workers_cfg)
    assert workers_cfg.threads_per_worker() == expected
    assert threads_per_worker(cfg, workers) == expected
    assert default_threads(cfg) == expected


@pytest.mark.parametrize("cores, workers, configured, elastic, expected", [
    (2, 2, 0, True, 2), (8, 2, 0, True, 8), (16, 4, 0, True, 16),
    (2, 1, 0, True, 0),  # one worker already has every core
    (2, 2, 1, True, 0),  # threads set: fixed
    (2, 2, 0, False, 0), (1, 2, 0, True, 0),
])
def test_elastic_width_is_every_core_unless_fixed(monkeypatch, cores, workers, configured, elastic, expected):
    from service.settings import WorkerConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("service.settings._cgroup_quota", lambda root: None)
    cfg = WorkerConfig(count=workers, threads=configured, elastic=elastic)
    assert cfg.wide_threads(cfg.threads_per_worker()) == expected


def test_set_threads_switches_sessions_and_keeps_the_answers(tmp_path):
    end2end_graph(tmp_path / "end2end.onnx")
    backend = create_backend(config(tmp_path), "cpu", threads=1)
    backend.load()
    batch = torch.rand(2, 3, SIZE, SIZE)
    narrow_session = backend.session
    expected = backend.infer(batch)
    backend.set_threads(2)
    wide_session = backend.session
    assert backend.threads == 2 and wide_session is not narrow_session
    assert wide_session.get_session_options().intra_op_num_threads == 2
    # both widths draw on the process's one CPU arena instead of growing one each
    for session in (narrow_session, wide_session):
        assert session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    got = backend.infer(batch)
    assert torch.equal(got.dets, expected.dets) and torch.equal(got.labels, expected.labels)
    backend.set_threads(1)  # back: the first session again, not a third
    assert backend.session is narrow_session and backend.threads == 1
    backend.set_threads(2)
    assert backend.session is wide_session
    backend.close()


@pytest.mark.parametrize("files, cores, expected", [
    ({"cpu.max": "200000 100000\n"}, 64, 2),  # a pod with limits.cpu = 2 on a 64-core node
    ({"cpu.max": "150000 100000\n"}, 64, 2),  # 1.5 cores: rounded up
    ({"cpu.max": "max 100000\n"}, 8, 8),  # no quota
    ({"cpu.max": "800000 100000\n"}, 4, 4),  # a quota above the affinity mask does not add cores
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 16, 16),  # v1, no quota
    ({}, 6, 6),  # no cgroup filesystem
])
def test_available_cores_honours_a_cgroup_cpu_quota(tmp_path, monkeypatch, files, cores, expected):
    from service.settings import available_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    assert available_cores(tmp_path) == expected
