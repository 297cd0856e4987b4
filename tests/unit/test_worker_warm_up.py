"""The worker's warm-up (engine/worker.py warm_up) as a plain function: what it sends the predictor."""
from __future__ import annotations

from fakes import FakePredictor

from service.engine.worker import warm_up
from service.settings import ModelConfig


def _warm(tmp_path, arch: str, working_size=None, **fields) -> list[str]:
    calls = tmp_path / "calls.txt"
    calls.touch()
    cfg = ModelConfig(name="m", arch=arch, input_size=320, batch={"max_batch_size": 2}, **fields)
    predictor = FakePredictor(cfg, "cpu", 1, record_to=str(calls))
    if working_size is not None:
        predictor.working_size = lambda: working_size
    stages: list[str] = []
    warm_up(predictor, cfg, progress=stages.append)
    assert stages[-1].startswith("warmed up in")
    return calls.read_text().splitlines()


def test_the_warm_up_sends_the_shape_the_family_works_at(tmp_path):
    # A two-stage model without resize_scale works at mmdet's 1333x800, not at a square input_size.
    lines = _warm(tmp_path, "faster-rcnn-r50-fpn", working_size=(1333, 800))
    assert lines == ["RawImage:1333x800"] * 2 + ["RawImage:1333x800 RawImage:1333x800"]


def test_a_predictor_that_does_not_say_its_working_size_warms_up_square(tmp_path):
    # predictor_factory is an extension point: a third-party predictor need not know working_size.
    assert _warm(tmp_path, "rtmdet-tiny") == ["RawImage:320x320"] * 2 + ["RawImage:320x320 RawImage:320x320"]
