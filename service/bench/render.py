"""docs/benchmarks.md from a report's data: facts, targets with verdicts, one table per section
(each naming its command), and the hand-written analysis in bench/analysis.md."""
from __future__ import annotations

import math
import re
import statistics
from datetime import datetime, timezone

from .servers import ROOT
from .stats import RunResult, markdown_table

ANALYSIS = ROOT / "bench" / "analysis.md"

SECTION_TITLES = {
    "overhead": "Serving overhead: `null` model vs TorchServe no-op handler, concurrency 16",
    "client": "Load client ceiling (detserve `null` model, other doors and clients)",
    "rtmdet": "Bundled `rtmdet`, concurrency 16: served vs in-process",
    "latency": "Bundled `rtmdet`, concurrency 1: latency",
    "sweep": "Bundled `rtmdet` over REST: closed-loop concurrency sweep",
    "torchserve": "Bundled `rtmdet` vs TorchServe handlers (same weights, same pipeline functions)",
    "onnx": "In-process eager PyTorch vs ONNX Runtime (CPU EP), fixed batch sizes",
    "warmup": "Warm-up runs (not used in ratios)",
}


def _rows(data: dict, section: str) -> list[RunResult]:
    fields = set(RunResult.__dataclass_fields__)
    out = []
    for raw in data["sections"].get(section, []):
        item = {k: (math.nan if v is None else v) for k, v in raw.items() if k in fields}
        out.append(RunResult(**item))
    return out


def _base(label: str) -> str:
    return re.sub(r" #\d+$", "", label)


def _mean(data: dict, section: str, base: str, attr: str) -> float:
    values = [getattr(r, attr) for r in _rows(data, section) if _base(r.label) == base]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def targets(data: dict) -> list[dict]:
    """Each target: what, goal, measured, met (None when not measured)."""
    out = []

    def add(name: str, goal: str, value: float, ok, detail: str) -> None:
        met = None if not math.isfinite(value) else bool(ok(value))
        out.append({"name": name, "goal": goal, "measured": value, "met": met, "detail": detail})

    ds_null = _mean(data, "overhead", "detserve null REST c16", "throughput")
    ts_noop = _mean(data, "overhead", "TorchServe no-op c16", "throughput")
    p99_null = _mean(data, "overhead", "detserve null REST c16", "p99_ms")
    add("(i) overhead: detserve null / TorchServe no-op throughput, c16", ">= 3.0x", _ratio(ds_null, ts_noop),
        lambda v: v >= 3.0, f"{ds_null:.0f} vs {ts_noop:.0f} req/s")
    add("(i) overhead: detserve null p99, c16", "<= 10 ms", p99_null, lambda v: v <= 10.0, f"{p99_null:.2f} ms")
    inproc = _mean(data, "rtmdet", "in-process rtmdet c16", "throughput")
    rest = _mean(data, "rtmdet", "detserve rtmdet REST c16", "throughput")
    grpc = _mean(data, "rtmdet", "detserve rtmdet gRPC c16", "throughput")
    add("(ii) rtmdet REST / in-process throughput, c16", ">= 0.95x", _ratio(rest, inproc), lambda v: v >= 0.95,
        f"{rest:.1f} vs {inproc:.1f} img/s")
    add("(ii) rtmdet gRPC / in-process throughput, c16", ">= 0.97x", _ratio(grpc, inproc), lambda v: v >= 0.97,
        f"{grpc:.1f} vs {inproc:.1f} img/s")
    in_p50 = _mean(data, "latency", "in-process rtmdet c1", "p50_ms")
    for variant, text in (("batch delay 0", "batch delay 0"), ("bundled delay", "bundled model.toml batch delay")):
        rest_p50 = _mean(data, "latency", f"detserve rtmdet REST c1, {variant}", "p50_ms")
        add(f"(ii) rtmdet REST p50 - in-process p50, c1 ({text})", "<= +2 ms", rest_p50 - in_p50,
            lambda v: v <= 2.0, f"{rest_p50:.2f} vs {in_p50:.2f} ms")
    ds = _mean(data, "torchserve", "detserve rtmdet REST c16", "throughput")
    ds_p99 = _mean(data, "torchserve", "detserve rtmdet REST c16", "p99_ms")
    ts = _mean(data, "torchserve", "TorchServe mmdet-style c16", "throughput")
    ts_p99 = _mean(data, "torchserve", "TorchServe mmdet-style c16", "p99_ms")
    add("(iii) rtmdet: detserve / TorchServe mmdet-style throughput, c16", ">= 2.0x", _ratio(ds, ts), lambda v: v >= 2.0,
        f"{ds:.1f} vs {ts:.1f} img/s")
    add("(iii) rtmdet: detserve / TorchServe mmdet-style p99, c16", "<= 0.5x", _ratio(ds_p99, ts_p99), lambda v: v <= 0.5,
        f"{ds_p99:.0f} vs {ts_p99:.0f} ms")
    bench = _mean(data, "overhead", "detserve null REST c16", "throughput")
    wrk = _mean(data, "overhead", "wrk: detserve null c16", "throughput")
    add("load client ceiling: detserve bench / wrk on the same null server, c16", ">= 0.9x (client not the bottleneck)",
        _ratio(bench, wrk), lambda v: v >= 0.9, f"{bench:.0f} vs {wrk:.0f} req/s")
    return out


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")


def render_markdown(data: dict, opts) -> str:
    facts = data["facts"]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`detserve bench report{' --quick' if opts.quick else ''}`) on {now}, "
        f"in {facts.get('elapsed_s', '?')} s. Every figure below comes from that one run; systems were measured "
        "in alternation (detserve, then TorchServe, round after round) so load drift hits both. "
        "Raw data: `bench/results/latest.json`.",
        "",
        "## Machine and versions",
        "",
    ]
    m, v = facts["machine"], facts["versions"]
    lines.append(f"- CPU: {m['cpu']}, {m['cores']} cores usable, {m['memory_gib']} GiB RAM; {m['os']}, kernel {m['kernel']}; no GPU.")
    lines.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    lines.append(f"- CPU placement: {facts['placement']}. TorchServe gets the same: Java frontend on the front "
                 "core(s), its Python worker on the worker core(s) with the same thread count.")
    lines.append(f"- Images: {facts['corpus']} (generated shapes, JPEG q90, long side 480-1024 px), cycled.")
    lines.append(f"- Load average before / after: {', '.join(f'{x:.2f}' for x in facts['load_before'])} / "
                 f"{', '.join(f'{x:.2f}' for x in facts.get('load_after', ()))}.")
    busy = facts.get("busy_before") or []
    if busy:
        lines.append("- **Other CPU-heavy processes were running at the start** (figures are noisier): "
                     + "; ".join(f"`{b}`" for b in busy))
    else:
        lines.append("- No other CPU-heavy process was running at the start.")
    o = facts["options"]
    lines.append(f"- Each measured run: {o['warmup_s']} s warm-up then {o['duration_s']} s; {o['rounds']} round(s) "
                 f"per comparison; TorchServe warmed {o['ts_warmup_s']} s before its first measured run.")
    if facts.get("torchserve_error"):
        lines.append(f"- TorchServe could not run: {facts['torchserve_error']}")
    if facts.get("onnx_skipped"):
        lines.append(f"- ONNX comparison skipped: {facts['onnx_skipped']}")
    lines.append("- GPU figures (issue 8, item 5): not measured; this run had no GPU. "
                 "`detserve bench` runs unchanged against a GPU server.")
    lines += ["", "## Targets", "", "| target | goal | measured | verdict | figures |", "|---|---|---:|---|---|"]
    for t in targets(data):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {t['goal']} | {_fmt(t['measured'])} | {verdict} | {t['detail']} |")
    lines.append("")
    for key in ("overhead", "client", "rtmdet", "latency", "sweep", "torchserve", "onnx", "warmup"):
        rows = _rows(data, key)
        if not rows:
            continue
        lines += [f"## {SECTION_TITLES[key]}", ""]
        lines.append(markdown_table(rows).rstrip())
        lines += ["", "Commands (ports are the run's free ports):", ""]
        for raw in data["sections"][key]:
            lines.append(f"- {raw['label']}: `{raw['extra'].get('command', '?')}`")
        stages = [(raw["label"], raw["extra"].get("stage_ms")) for raw in data["sections"][key] if raw["extra"].get("stage_ms")]
        if stages:
            lines += ["", "In-process time per image by stage (ms; inference and preprocess are per batch, shared by its images):", ""]
            for label, st in stages:
                lines.append(f"- {label} (mean batch {data_batch(data, key, label)}): "
                             + ", ".join(f"{k} {val:.2f}" for k, val in st.items()))
        lines.append("")
    if ANALYSIS.is_file():
        lines += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(lines)


def data_batch(data: dict, section: str, label: str) -> str:
    for raw in data["sections"][section]:
        if raw["label"] == label:
            return str(raw["extra"].get("mean_batch", "?"))
    return "?"
