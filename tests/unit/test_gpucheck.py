"""`make gpu-check`: the parts that run without a GPU (table, pytest summary, budget, the no-GPU exit)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from service.gpucheck import NO_GPU_EXIT, Budget, Row, parse_pytest_summary, render_table


def test_table_has_one_aligned_line_per_row():
    rows = [Row("parity", "rtmdet", "ort tensorrt-fp16", "PASS", "55/55 matched"),
            Row("bench-inproc", "rtmdet", "eager fp32 b8", "812.3 img/s")]
    lines = render_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("stage") and set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].index("rtmdet") == lines[3].index("rtmdet") == lines[0].index("model")
    assert lines[2].endswith("55/55 matched") and lines[3].rstrip().endswith("812.3 img/s")


@pytest.mark.parametrize("output, summary", [
    ("..s\nFAILED tests/x.py::t\n1 failed, 2 passed, 1 skipped in 3.21s\n", "1 failed, 2 passed, 1 skipped in 3.21s"),
    ("========== 5 passed, 900 deselected in 40.1s ==========", "5 passed, 900 deselected in 40.1s"),
    ("ImportError: boom", "no summary"),
])
def test_pytest_summary_is_the_last_summary_line(output, summary):
    assert parse_pytest_summary(output) == summary


def test_budget_counts_down_on_the_injected_clock():
    now = [100.0]
    budget = Budget(60, clock=lambda: now[0])
    assert budget.allows(60) and not budget.allows(61)
    now[0] += 45
    assert budget.left() == 15 and not budget.allows(20)
    now[0] += 100
    assert budget.left() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_exits_2_with_a_clear_message_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "service.gpucheck"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == NO_GPU_EXIT
    assert "gpu-check: no GPU here, nothing was run" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_stage_and_prints_one_table(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "service.gpucheck", "--dry-run-cpu", "--budget-s", "300", "--json", str(out)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    import json

    rows = json.loads(out.read_text())
    stages = {r["stage"] for r in rows}
    assert {"parity", "bench-inproc", "bench-served", "bench-tiles"} <= stages
    assert not [r for r in rows if r["result"] in ("ERROR", "FAIL")], rows
    assert proc.stdout.count("\nstage ") + proc.stdout.startswith("stage ") == 1  # one table
