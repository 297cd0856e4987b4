"""The Mask R-CNN section of the bench: its model folder, its ratio, and (slow) a real tiny run of both sides."""
from __future__ import annotations

import math

import pytest

from service.bench.two_stage import (
    INPROC_PREFIX, SECTION, SERVED_PREFIX, TwoStageBench, describe_ratio, pooled_ratio, two_stage_ratio, write_bench_model,
)
from service.settings import load_model_config


def test_bench_model_folder_is_a_valid_model_with_the_benchmark_settings(tmp_path):
    bench = TwoStageBench(resize_scale=(640, 384), max_per_img=50, rpn_max_per_img=300, max_batch_size=3,
                          threads=1, backend="eager")
    cfg = load_model_config(write_bench_model(tmp_path, bench))
    assert cfg.arch == "mask-rcnn-r50-fpn" and cfg.backend == "eager"
    assert tuple(cfg.resize_scale) == (640, 384)
    assert cfg.test_cfg.max_per_img == 50 and cfg.test_cfg.rpn.max_per_img == 300
    assert cfg.batch.max_batch_size == 3 and cfg.batch.max_batch_delay_ms == 0
    assert cfg.batch.request_timeout_ms == bench.timeout_s * 1000  # no 504 behind slow batches
    assert cfg.workers.count == 1 and cfg.workers.threads == 1


def test_bench_options_refuse_a_run_smaller_than_the_concurrency():
    with pytest.raises(ValueError, match="images_per_run"):
        TwoStageBench(concurrency=4, images_per_run=2)


def _row(label: str, ok: int, seconds: float) -> dict:
    return {"label": label, "ok": ok, "duration_s": seconds, "throughput": ok / seconds}


def test_ratio_is_the_median_of_back_to_back_rounds_and_the_pooled_one_weights_slow_rounds():
    sections = {SECTION: [
        _row(f"{INPROC_PREFIX}4 #1", 8, 10.0), _row(f"{SERVED_PREFIX}4 #1", 8, 10.5),
        _row(f"{SERVED_PREFIX}4 #2", 8, 40.0), _row(f"{INPROC_PREFIX}4 #2", 8, 20.0),  # a slow, noisy round
        _row(f"{INPROC_PREFIX}4 #3", 8, 10.0), _row(f"{SERVED_PREFIX}4 #3", 8, 10.0),
    ]}
    median, per_round = two_stage_ratio(sections)
    assert per_round == pytest.approx([10.0 / 10.5, 0.5, 1.0])
    assert median == pytest.approx(10.0 / 10.5)
    assert pooled_ratio(sections) == pytest.approx((24 / 60.5) / (24 / 40.0))
    assert describe_ratio(sections).startswith("0.952x median of 3 rounds (0.952, 0.500, 1.000; pooled")


def test_ratio_is_nan_without_runs():
    total, per_round = two_stage_ratio({})
    assert math.isnan(total) and per_round == []
    assert describe_ratio({}) == "not measured"


@pytest.mark.slow
def test_both_sides_run_the_same_images_in_alternating_order(tmp_path):
    """A tiny configuration through the real section: a served detserve and the in-process predictor."""
    from service.bench.corpus import generated_corpus
    from service.bench.report import Recorder

    rec = Recorder()
    bench = TwoStageBench(resize_scale=(160, 128), max_per_img=5, rpn_max_per_img=50, concurrency=2,
                          max_batch_size=2, backend="eager", threads=1, images_per_run=4, rounds=2)
    from service.bench.two_stage import render_section, run_two_stage

    facts = run_two_stage(rec, tmp_path / "store", generated_corpus(4, seed=1, max_side=480), bench)
    rows = rec.sections[SECTION]
    assert [r["label"] for r in rows] == [f"{INPROC_PREFIX}2 #1", f"{SERVED_PREFIX}2 #1",
                                          f"{SERVED_PREFIX}2 #2", f"{INPROC_PREFIX}2 #2"]
    for r in rows:
        assert r["ok"] == 4 and not r["errors"], r
    assert facts["backend"] == "eager" and facts["served_backend"].startswith("eager")
    total, per_round = two_stage_ratio(rec.sections)
    assert math.isfinite(total) and len(per_round) == 2
    text = render_section({"facts": {"two_stage": facts}, "sections": rec.sections})
    assert "Served / in-process throughput" in text and "mask-rcnn-r50-fpn" in text


def test_the_report_renders_the_section_and_its_target_row():
    import json

    from service.bench.render import render_markdown, targets
    from service.bench.report import ReportOptions
    from service.bench.servers import ROOT

    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    rows = [_row(f"{INPROC_PREFIX}4 #1", 8, 10.0), _row(f"{SERVED_PREFIX}4 #1", 8, 10.2)]
    for r in rows:
        r.update(target="x", concurrency=4, rate=None, requests=8, errors={}, p50_ms=1.0, p90_ms=1.0, p99_ms=1.0,
                 max_ms=1.0, mean_ms=1.0, extra={})
    data["sections"][SECTION] = rows
    data["facts"]["two_stage"] = {"bench": {"arch": "mask-rcnn-r50-fpn", "max_per_img": 50}, "backend": "onnxruntime"}
    text = render_markdown(data, ReportOptions())
    assert "## Mask R-CNN R-50" in text and "0.980x median of 1 rounds" in text
    row = next(t for t in targets(data) if t["name"].startswith("Mask R-CNN R-50"))
    assert row["measured"] == pytest.approx(10.0 / 10.2) and row["met"] is True


def test_a_re_render_keeps_the_run_s_date():
    """Re-rendering after an edit to bench/analysis.md dates the doc by the run, not by the render."""
    import json

    from service.bench.render import render_markdown
    from service.bench.report import ReportOptions
    from service.bench.servers import ROOT

    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    data["facts"]["finished_at"] = "2026-01-02 03:04 UTC"
    assert "on 2026-01-02 03:04 UTC, in" in render_markdown(data, ReportOptions())


def test_cli_refuses_bad_settings_with_a_message():
    from service.cli import main

    with pytest.raises(SystemExit, match="images_per_run \\(2\\) must be >= concurrency \\(4\\)"):
        main(["bench", "two-stage", "--images-per-run", "2"])
    with pytest.raises(SystemExit, match="two edges"):
        main(["bench", "two-stage", "--scale", "512"])
