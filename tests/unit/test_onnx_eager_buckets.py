"""Eager backend `compile` / `cuda_graphs`: batches padded to fixed buckets, results sliced back."""
from __future__ import annotations

import logging

import pytest
import torch

from service.backends.buckets import bucket_sizes
from service.backends.eager import EagerBackend
from service.detectors.checkpoint import Checkpoint
from service.detectors.registry import build_detector
from service.settings import ModelConfig

SIZE = 64


def backend(tmp_path, **eager) -> tuple[EagerBackend, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", 2)
    cfg = ModelConfig(name="m", arch="rtmdet-tiny", weights="w.pth", input_size=SIZE, device="cpu",
                      eager=eager, batch={"max_batch_size": 6}, root=tmp_path)
    b = EagerBackend(cfg, "cpu", checkpoint=Checkpoint(model.state_dict(), ("a", "b")))
    b.load()
    return b, model


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(6) == [1, 2, 4, 6]


def test_padded_buckets_give_the_plain_results(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        b, model = backend(tmp_path, cuda_graphs=True)  # CPU: buckets only, with a warning
    assert "needs a CUDA device" in caplog.text
    x = torch.randn(9, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    for n in (3, 5, 9):  # 3 -> 4, 5 -> 6, 9 -> 6 + 4 (chunks past max_batch_size)
        got = b.infer(x[:n])
        for g, w in zip(got, want):
            assert g.shape[0] == n
            torch.testing.assert_close(g, w[:n], atol=1e-4, rtol=1e-4)
    assert {s[0] for s in b._model.shapes_seen} == {4, 6}


@pytest.mark.slow
def test_torch_compile_runs_one_shape_per_bucket(tmp_path):
    b, model = backend(tmp_path, compile=True)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    for n in (1, 3, 4):
        got = b.infer(x[:n])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w[:n], atol=1e-3, rtol=1e-3)
    assert {s[0] for s in b._model.shapes_seen} == {1, 4}


@pytest.mark.gpu
def test_cuda_graphs_replay_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = build_detector("rtmdet-tiny", 2)
    cfg = ModelConfig(name="m", arch="rtmdet-tiny", weights="w.pth", input_size=SIZE, device="cuda",
                      eager={"cuda_graphs": True}, batch={"max_batch_size": 4}, root=tmp_path)
    b = EagerBackend(cfg, "cuda:0", checkpoint=Checkpoint(model.state_dict(), ("a", "b")))
    b.load()
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model.cuda()(x.cuda())
    for _ in range(2):  # capture, then replay
        for g, w in zip(b.infer(x), want):
            torch.testing.assert_close(g, w.float(), atol=1e-3, rtol=1e-3)
