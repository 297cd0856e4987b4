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
    "overhead": "Serving overhead: `null` model vs TorchServe no-op handler and bare FastAPI, concurrency 16",
    "shipped": "Bundled `rtmdet` as shipped, concurrency 16: served vs the in-process pipeline (same backend; one pipeline on the threads a lone batch gets)",
    "latency": "Bundled `rtmdet` as shipped, concurrency 1: served vs in-process latency",
    "torchserve": "Bundled `rtmdet` vs TorchServe 0.12 handlers (same weights, same pipeline functions), every TorchServe variant",
    "client": "Other doors and the load client ceiling (`null` model)",
    "placement": "Thread placement: workers x intra-op threads for the served `rtmdet` (the measurement behind the default)",
    "eager": "The eager PyTorch backend (`backend = \"eager\"`), served vs in-process",
    "pinned": "Extra: pinned split (front and load client on one core, model worker on the other, 1 thread)",
    "two-stage": "Mask R-CNN R-50 (random weights), concurrency 4: served vs the in-process pipeline (same backend, threads, batches, images)",
    "warmup": "Warm-up runs (not used in ratios)",
}
SECTION_ORDER = ("overhead", "shipped", "latency", "torchserve", "client", "placement", "eager", "pinned", "two-stage",
                 "warmup")
CUSTOM_SECTIONS = {"two-stage"}  # rendered by their own module: a table plus how the run was set up
STOLEN_NOTE = 0.10  # a run's stolen CPU share above which its section names it


def _rows(data: dict, section: str) -> list[RunResult]:
    fields = set(RunResult.__dataclass_fields__)
    out = []
    for raw in data["sections"].get(section, []):
        item = {k: (math.nan if v is None else v) for k, v in raw.items() if k in fields}
        out.append(RunResult(**item))
    return out


def _values(data: dict, section: str, prefix: str, attr: str) -> list[float]:
    values = [getattr(r, attr) for r in _rows(data, section) if r.label.startswith(prefix)]
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(data: dict, section: str, prefix: str, attr: str) -> float:
    values = _values(data, section, prefix, attr)
    return statistics.fmean(values) if values else math.nan


def _paired_median(data: dict, section: str, a_prefix: str, b_prefix: str, attr: str) -> tuple[float, list[float]]:
    """Median over rounds of (a - b), pairing the runs labelled "... #k": a difference of two
    latencies a few ms apart, where the machine's own speed drifts by more from round to round."""
    def by_round(prefix: str) -> dict[str, float]:
        return {r.label.rsplit("#", 1)[-1]: getattr(r, attr) for r in _rows(data, section)
                if r.label.startswith(prefix) and "#" in r.label and math.isfinite(getattr(r, attr))}
    a, b = by_round(a_prefix), by_round(b_prefix)
    diffs = [a[k] - b[k] for k in sorted(a.keys() & b.keys(), key=lambda k: int(k) if k.isdigit() else 0)]
    return (statistics.median(diffs) if diffs else math.nan), diffs


def _fastest(data: dict, section: str, prefix: str, attr: str, lowest: bool = False) -> RunResult | None:
    rows = [r for r in _rows(data, section) if r.label.startswith(prefix)
            and isinstance(getattr(r, attr), (int, float)) and math.isfinite(getattr(r, attr))]
    return (min if lowest else max)(rows, key=lambda r: getattr(r, attr)) if rows else None


def _best(data: dict, section: str, prefix: str, attr: str, lowest: bool = False) -> tuple[float, str]:
    """A peer at its best: the fastest of its variants (highest throughput, or lowest latency)."""
    pick = _fastest(data, section, prefix, attr, lowest)
    if pick is None:
        return math.nan, "-"
    return getattr(pick, attr), pick.label[len(prefix):].lstrip(", ")


def _beside_best(data: dict, section: str, peer_prefix: str, ours_prefix: str) -> float:
    """Our throughput in the run measured right before the peer's fastest variant: the headline takes
    the mean of our runs beside every variant (the stricter figure), this one the closest pairing."""
    pick = _fastest(data, section, peer_prefix, "throughput")
    if pick is None:
        return math.nan
    return _mean(data, section, f"{ours_prefix} (before {pick.extra.get('ts_variant')})", "throughput")


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def targets(data: dict) -> list[dict]:
    """Each target of issue 14: what, goal, measured, met (None when not measured)."""
    out = []

    def add(name: str, goal: str, value: float, ok, detail: str) -> None:
        """`ok=None`: a figure shown for reference, with no goal to meet."""
        met = None if not math.isfinite(value) or ok is None else bool(ok(value))
        out.append({"name": name, "goal": goal, "measured": value, "met": met, "detail": detail})

    ds16 = _mean(data, "torchserve", "detserve rtmdet REST c16", "throughput")
    ts16, ts16_v = _best(data, "torchserve", "TorchServe mmdet-style c16", "throughput")
    paired = _beside_best(data, "torchserve", "TorchServe mmdet-style c16", "detserve rtmdet REST c16")
    add("rtmdet as shipped / TorchServe mmdet-style at its best, throughput c16", ">= 2.5x", _ratio(ds16, ts16),
        lambda v: v >= 2.5, f"{ds16:.1f} vs {ts16:.1f} img/s (TorchServe: {ts16_v})"
        + (f"; against the detserve run just before that variant: {_ratio(paired, ts16):.2f}x" if math.isfinite(paired) else ""))
    tsb, tsb_v = _best(data, "torchserve", "TorchServe batched (8, 50 ms) c16", "throughput")
    add("rtmdet as shipped / TorchServe batched handler at its best, throughput c16", "(for reference)",
        _ratio(ds16, tsb), None, f"{ds16:.1f} vs {tsb:.1f} img/s (TorchServe: {tsb_v})")
    ds1 = _mean(data, "latency", "detserve rtmdet REST c1", "p50_ms")
    ts1, ts1_v = _best(data, "torchserve", "TorchServe mmdet-style c1", "p50_ms", lowest=True)
    add("rtmdet as shipped / TorchServe mmdet-style at its best, p50 latency c1", "<= 0.5x", _ratio(ds1, ts1),
        lambda v: v <= 0.5, f"{ds1:.2f} vs {ts1:.2f} ms (TorchServe: {ts1_v})")
    served = _mean(data, "shipped", "detserve rtmdet REST c16", "throughput")
    inproc = _mean(data, "shipped", "in-process rtmdet c16", "throughput")
    add("rtmdet as shipped / in-process pipeline on the threads a lone batch gets, throughput c16", ">= 0.95x",
        _ratio(served, inproc), lambda v: v >= 0.95, f"{served:.1f} vs {inproc:.1f} img/s")
    in1 = _mean(data, "latency", "in-process rtmdet c1", "p50_ms")
    gap, diffs = _paired_median(data, "latency", "detserve rtmdet REST c1", "in-process rtmdet c1", "p50_ms")
    add("rtmdet as shipped: served p50 - in-process p50, c1 (median of alternating rounds)", "<= +1 ms", gap,
        lambda v: v <= 1.0, f"means {ds1:.2f} vs {in1:.2f} ms; per round " + ", ".join(f"{d:+.2f}" for d in diffs))
    null = _mean(data, "overhead", "detserve null REST c16", "throughput")
    null_p99 = _mean(data, "overhead", "detserve null REST c16", "p99_ms")
    noop, noop_v = _best(data, "overhead", "TorchServe no-op c16", "throughput")
    bare = _mean(data, "overhead", "bare FastAPI no-op c16", "throughput")
    bare_p99 = _mean(data, "overhead", "bare FastAPI no-op c16", "p99_ms")
    add("null / TorchServe no-op at its best, throughput c16", ">= 2.5x", _ratio(null, noop), lambda v: v >= 2.5,
        f"{null:.0f} vs {noop:.0f} req/s (TorchServe: {noop_v})")
    add("null p99, c16", "<= 10 ms", null_p99, lambda v: v <= 10.0, f"{null_p99:.2f} ms (bare FastAPI {bare_p99:.2f} ms)")
    add("null / bare FastAPI no-op, throughput c16", ">= 0.5x", _ratio(null, bare), lambda v: v >= 0.5,
        f"{null:.0f} vs {bare:.0f} req/s")
    from .two_stage import two_stage_ratio

    two, per_round = two_stage_ratio(data["sections"])
    add("Mask R-CNN R-50 / in-process pipeline (same backend, threads and batches), throughput c4", ">= 0.95x", two,
        lambda v: v >= 0.95, "rounds " + ", ".join(f"{x:.3f}" for x in per_round) if per_round else "-")
    py = _mean(data, "client", "detserve null REST c16, Python asyncio client", "throughput")
    add("load client check: Python asyncio client / wrk on the same null server, c16", "(for reference)",
        _ratio(py, null), None, f"{py:.0f} vs {null:.0f} req/s")
    return out


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")


def render_markdown(data: dict, opts) -> str:
    facts = data["facts"]
    # The run's own time: re-rendering after an edit to bench/analysis.md must not re-date the figures.
    now = facts.get("finished_at") or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
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
    lines.append(f"- detserve as shipped: the bundled `model.toml` unchanged, nothing pinned, default log level "
                 f"(an access-log line per request); "
                 + (f"{facts['served_layout']}" if facts.get("served_layout") else
                    f"served workers get {facts.get('served_threads', '?')} intra-op thread(s)")
                 + f"; the in-process limit runs on {facts.get('served_threads', '?')} thread(s); "
                 f"backend {facts.get('shipped_backend', '?')}.")
    lines.append(f"- Start-up of `detserve serve` (null + rtmdet) until ready: first start with a cold export cache "
                 f"{facts.get('start_first_s', '?')} s, second start {facts.get('start_second_s', '?')} s.")
    lines.append("- TorchServe 0.12 at its best: its defaults (a worker per logical CPU, no thread setting) and "
                 "1 or all cores' threads with 1 worker, and one worker per core with 1 thread; each ratio takes the "
                 "fastest variant. Nothing pinned, as for detserve.")
    if facts.get("pinned_placement"):
        lines.append(f"- Extra pinned table: {facts['pinned_placement']}.")
    lines.append(f"- Images: {facts['corpus']} (generated shapes, JPEG q90, long side 480-1024 px), cycled.")
    lines.append(f"- Load average before / after: {', '.join(f'{x:.2f}' for x in facts['load_before'])} / "
                 f"{', '.join(f'{x:.2f}' for x in facts.get('load_after', ()))}.")
    steal = facts.get("steal_share")
    if steal is not None:
        lines.append(f"- CPU time stolen by the hypervisor during the run: {steal:.0%}"
                     + (" (a quiet VM shows about 0%)." if steal < 0.05 else
                        " - **other guests shared these cores**: absolute figures are lower and noisier than on a "
                        "quiet machine; the ratios still compare systems measured in alternation."))
    busy = facts.get("busy_before") or []
    if busy:
        lines.append("- **Other CPU-heavy processes were running at the start** (figures are noisier): "
                     + "; ".join(f"`{b}`" for b in busy))
    else:
        lines.append("- No other CPU-heavy process was running at the start.")
    o = facts["options"]
    lines.append(f"- Each measured run: {o['warmup_s']} s warm-up then {o['duration_s']} s (null, no-op) or "
                 f"{o['model_duration_s']} s (rtmdet); {o['rounds']} round(s) per comparison; each TorchServe "
                 f"variant warmed {o['ts_warmup_s']} s before its measured runs.")
    for key, error in (facts.get("torchserve_errors") or {}).items():
        lines.append(f"- TorchServe variant {key} could not run: {error}")
    if facts.get("two_stage_error"):
        lines.append(f"- Mask R-CNN R-50 section failed: {facts['two_stage_error']}")
    if facts.get("onnx_skipped"):
        lines.append(f"- ONNX comparison skipped: {facts['onnx_skipped']}")
    lines.append("- GPU figures: not measured here (no GPU); `make gpu-check` measures them on a GPU machine.")
    lines += ["", "## Targets", "", "| target | goal | measured | verdict | figures |", "|---|---|---:|---|---|"]
    for t in targets(data):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        if t["met"] is None and t["goal"] == "(for reference)" and math.isfinite(t["measured"]):
            verdict = "-"
        lines.append(f"| {t['name']} | {t['goal']} | {_fmt(t['measured'])} | {verdict} | {t['detail']} |")
    lines.append("")
    for key in SECTION_ORDER:
        rows = _rows(data, key)
        if not rows:
            continue
        lines += [f"## {SECTION_TITLES[key]}", ""]
        if key in CUSTOM_SECTIONS:
            from .two_stage import render_section

            lines += [render_section(data)] + _stolen(data, key)
            continue
        lines.append(markdown_table(rows).rstrip())
        lines += ["", "Commands (ports are the run's free ports):", ""]
        for raw in data["sections"][key]:
            lines.append(f"- {raw['label']}: `{raw['extra'].get('command', '?')}`")
        lines += _stolen(data, key)
        stages = [(raw["label"], raw["extra"].get("stage_ms")) for raw in data["sections"][key] if raw["extra"].get("stage_ms")]
        if stages:
            lines += ["", ("In-process time per image by stage (ms; inference and preprocess are per batch, shared by its images; "
                      "decode is each image's own time, and a batch's images decode at once on the worker's threads, "
                      "so it is CPU time, not a share of the wall time):"), ""]
            for label, st in stages:
                lines.append(f"- {label} (mean batch {data_batch(data, key, label)}): "
                             + ", ".join(f"{k} {val:.2f}" for k, val in st.items()))
        lines.append("")
    if ANALYSIS.is_file():
        lines += [ANALYSIS.read_text().rstrip(), ""]
    return "\n".join(lines)


def _stolen(data: dict, section: str) -> list[str]:
    robbed = [(raw["label"], raw["extra"]["steal"]) for raw in data["sections"][section]
              if raw["extra"].get("steal", 0.0) >= STOLEN_NOTE]
    if not robbed:
        return []
    return ["", f"Runs that lost at least {STOLEN_NOTE:.0%} of the CPU time to other guests of the VM (their figures "
            "understate the system measured): " + "; ".join(f"{label} {x:.0%}" for label, x in robbed) + "."]


def data_batch(data: dict, section: str, label: str) -> str:
    for raw in data["sections"][section]:
        if raw["label"] == label:
            return str(raw["extra"].get("mean_batch", "?"))
    return "?"
