"""Mask R-CNN R-50 served at concurrency 4 against the in-process pipeline: a section of `detserve bench
report`, and `detserve bench two-stage` on its own.

The two sides do the same work: the same calibrated random-weight model folder (no checkpoint download;
every image gives max_per_img detections with masks, so the RoI and mask stages cost what they cost with real weights),
the same backend and intra-op threads, the same images in the same order, the same batch size, and masks
pasted as RLE on both. Runs are counted in images, not seconds: at seconds per image a timed window
holds two or three batches and its throughput is mostly rounding. Each side gets an unmeasured warm-up
batch, and the order alternates round by round (in-process first, then served first) so load drift on
the machine hits both.
"""
from __future__ import annotations

import asyncio
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .inprocess import run_in_process
from .runner import LoadSpec, run_sweep
from .servers import DetserveServer
from .setup import load_predictor, toml_dumps
from .stats import RunResult
from .targets import make_target

SECTION = "two-stage"
MODEL = "mask-rcnn-r50"
SERVED_PREFIX = "detserve mask-rcnn-r50 REST c"
INPROC_PREFIX = "in-process mask-rcnn-r50 c"


@dataclass(frozen=True)
class TwoStageBench:
    """What the section measures. Lighter than mmdet's test config (1333x800, RPN 1000, 100 per image) so
    that three rounds fit in ~4 minutes on a 2-core VM: measured there (ONNX Runtime, 2 threads, batch of
    4), 666x400 / RPN 1000 / 100 per image took ~8 s an image (features 2.7, bbox head 2.5, masks 3.3);
    512x320 / 300 / 50 takes ~2 s, with the same stages and 50 RLE masks per answer."""

    arch: str = "mask-rcnn-r50-fpn"
    resize_scale: tuple[int, int] = (512, 320)
    max_per_img: int = 50
    rpn_max_per_img: int = 300
    concurrency: int = 4
    max_batch_size: int = 4
    # ONNX Runtime, exported here without auto's parity gate: with 80 random classes the gate refuses the
    # graphs for one borderline detection in ~700 (box diff 0.004 px) and would measure eager instead; the
    # pieces' parity is tested (tests/unit/test_detector_contract.py). "auto" and "eager" also work.
    backend: str = "onnxruntime"
    threads: int = 0  # 0: what the engine gives one worker on this machine (every core)
    # Many short rounds, not a few long ones: on a shared VM the speed drifts by 3x within minutes
    # (measured: the same 12-image run took 48 s and then 16 s), so the ratio is taken per round, where
    # both sides ran within seconds of each other, and the median over rounds is the figure.
    images_per_run: int = 8
    warmup_images: int = 4  # per side, unmeasured: ONNX Runtime's first runs allocate its arenas
    rounds: int = 6
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.concurrency < 1 or self.max_batch_size < 1 or self.rounds < 1:
            raise ValueError("concurrency, max_batch_size and rounds must be >= 1")
        if self.images_per_run < self.concurrency:
            raise ValueError(f"images_per_run ({self.images_per_run}) must be >= concurrency ({self.concurrency})")


def bench_store(bench: TwoStageBench) -> Path:
    """A model store kept in the export cache between runs: the calibrated checkpoint and its graphs
    depend on the arch (and seed) only - the graphs' spatial axes are dynamic and test_cfg runs host-side -
    so a second run skips a minute of calibration and export; model.toml is rewritten every run."""
    from ..backends.auto import cache_root

    return cache_root() / "bench-two-stage" / bench.arch


def write_bench_model(store: Path, bench: TwoStageBench, seed: int = 0) -> Path:
    """The model folder both sides load: a calibrated random-weight checkpoint with COCO's 80 classes."""
    from ..detectors.two_stage.calibrate import save_detecting_checkpoint

    folder = store / MODEL
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "weights.pth").exists():
        save_detecting_checkpoint(folder / "weights.pth", bench.arch, [f"class{i}" for i in range(80)], seed=seed)
    workers = {"count": 1, **({"threads": bench.threads} if bench.threads else {})}
    (folder / "model.toml").write_text(toml_dumps({
        "name": MODEL, "arch": bench.arch, "weights": "weights.pth", "backend": bench.backend,
        "resize_scale": list(bench.resize_scale), "default_score_thr": 0.05,
        "test_cfg": {"max_per_img": bench.max_per_img, "rpn": {"max_per_img": bench.rpn_max_per_img}},
        "workers": workers,
        # the default 30 s deadline answers 504 to requests queued behind two slow batches on a busy VM
        "batch": {"max_batch_size": bench.max_batch_size, "max_batch_delay_ms": 0.0,
                  "request_timeout_ms": bench.timeout_s * 1000},
    }))
    if bench.backend == "onnxruntime" and not (folder / "model.onnx").exists():
        from ..export.onnx_export import export_onnx
        from ..settings import load_model_config

        export_onnx(load_model_config(folder))  # the three graphs next to model.toml, as `detserve export` writes
    return folder


def run_two_stage(rec, store: Path, corpus: list[bytes], bench: TwoStageBench = TwoStageBench()) -> dict:
    """Measure the section into `rec` (a report.Recorder); returns facts for the report header."""
    from .report import served_threads

    folder = write_bench_model(store, bench)
    threads = served_threads(folder)
    images = corpus[:bench.images_per_run] if len(corpus) >= bench.images_per_run else corpus
    n = bench.images_per_run
    rec.log(f"{SECTION}: {bench.arch} at {bench.resize_scale}, {threads} thread(s), c{bench.concurrency}, "
            f"{n} images per run, {bench.rounds} round(s)")
    predictor = load_predictor(folder, threads)
    facts = {"backend": getattr(predictor, "backend_name", "?"), "threads": threads,
             "bench": {k: getattr(bench, k) for k in bench.__dataclass_fields__}}
    try:
        with DetserveServer(store, [MODEL], log_level=None, start_timeout_s=900) as server:
            facts["served_backend"] = _served_backend(server)
            w = max(bench.warmup_images, bench.concurrency)
            _in_process(rec, predictor, images, bench, w, f"{INPROC_PREFIX}{bench.concurrency} warm-up", section="warmup")
            _served(rec, server, images, bench, w, f"{SERVED_PREFIX}{bench.concurrency} warm-up", section="warmup")
            for r in range(bench.rounds):
                runs = [
                    lambda r=r: _in_process(rec, predictor, images, bench, n, f"{INPROC_PREFIX}{bench.concurrency} #{r + 1}"),
                    lambda r=r: _served(rec, server, images, bench, n, f"{SERVED_PREFIX}{bench.concurrency} #{r + 1}"),
                ]
                for run in (runs if r % 2 == 0 else runs[::-1]):
                    run()
    finally:
        predictor.close()
    return facts


def _in_process(rec, predictor, images, bench: TwoStageBench, n: int, label: str, section: str = SECTION) -> RunResult:
    c = bench.concurrency
    # run_in_process counts the first `c` submissions on top of `requests`
    result = run_in_process(predictor, images, concurrency=c, max_batch_size=bench.max_batch_size,
                            requests=n - c, duration_s=None, warmup_s=0.0, label=label, progress=False)
    return rec.add(section, result, f"detserve bench two-stage (in-process side): {n} images, c{c}, "
                   f"batches of up to {bench.max_batch_size}", "in-process")


def _served(rec, server: DetserveServer, images, bench: TwoStageBench, n: int, label: str,
            section: str = SECTION) -> RunResult:
    c = bench.concurrency
    target = make_target("rest", server.url, MODEL, images, pool_size=c)
    spec = LoadSpec(concurrency=c, requests=n, duration_s=None, warmup_s=0.0, timeout_s=bench.timeout_s,
                    progress=False)
    result = asyncio.run(run_sweep(target, [spec], label=label))[0]
    result.label = label
    return rec.add(section, result, f"detserve bench run --target rest --url {server.url} --model {MODEL} "
                   f"--concurrency {c} --requests {n} --warmup 0", "detserve")


def _served_backend(server: DetserveServer) -> str:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.mgmt_port}/models/{MODEL}", timeout=10) as r:
            body = json.loads(r.read())
        entry = body[0] if isinstance(body, list) else body
        return f"{entry.get('backend')} ({entry.get('backendReason', '')})"
    except Exception as exc:  # noqa: BLE001 - a fact for the report, never a reason to stop
        return f"unknown ({exc})"


def two_stage_ratio(sections: dict) -> tuple[float, list[float]]:
    """Served / in-process throughput: the median over rounds, and each round's ratio (its served run
    against its in-process run, measured back to back)."""
    rows = sections.get(SECTION, [])
    served = [r for r in rows if r["label"].startswith(SERVED_PREFIX)]
    inproc = [r for r in rows if r["label"].startswith(INPROC_PREFIX)]
    per_round = [s["throughput"] / i["throughput"] for s, i in zip(served, inproc) if i["throughput"]]
    return (statistics.median(per_round) if per_round else math.nan), per_round


def pooled_ratio(sections: dict) -> float:
    """All served images over all served time, against the same for in-process: weights slow rounds more."""
    rows = sections.get(SECTION, [])

    def rate(prefix: str) -> float:
        runs = [r for r in rows if r["label"].startswith(prefix)]
        seconds = sum(r["duration_s"] for r in runs)
        return sum(r["ok"] for r in runs) / seconds if seconds > 0 else math.nan

    inproc = rate(INPROC_PREFIX)
    return rate(SERVED_PREFIX) / inproc if inproc > 0 else math.nan


def describe_ratio(sections: dict) -> str:
    median, per_round = two_stage_ratio(sections)
    if not per_round:
        return "not measured"
    text = f"{median:.3f}x median of {len(per_round)} rounds ({', '.join(f'{x:.3f}' for x in per_round)}"
    if len(per_round) > 1:
        text += f"; pooled over all rounds {pooled_ratio(sections):.3f}x"
    return text + ")"


def measure_alone(bench: TwoStageBench = TwoStageBench()) -> tuple[dict, str]:
    """`detserve bench two-stage`: the section on its own, with the report's corpus and recorder."""
    import time

    from .corpus import describe, generated_corpus
    from .report import Recorder

    rec = Recorder()
    corpus = generated_corpus(16, seed=0)
    facts = run_two_stage(rec, bench_store(bench), corpus, bench)
    facts["corpus"] = describe(corpus)
    facts["elapsed_s"] = round(time.monotonic() - rec.start, 1)
    data = {"facts": {"two_stage": facts}, "sections": rec.sections}
    return data, render_section(data)


def render_section(data: dict) -> str:
    """The section's markdown: its table, the ratio and how the run was set up."""
    from .stats import RunResult, markdown_table

    rows = data["sections"].get(SECTION, [])
    if not rows:
        return ""
    fields = set(RunResult.__dataclass_fields__)
    table = markdown_table([RunResult(**{k: (math.nan if v is None else v) for k, v in r.items() if k in fields})
                            for r in rows]).rstrip()
    facts = data["facts"].get("two_stage", {})
    b = facts.get("bench", {})
    lines = [table, "",
             f"Served / in-process throughput: **{describe_ratio(data['sections'])}** (goal >= 0.95x).", "",
             f"- Model: `{b.get('arch')}`, calibrated random weights (every image gives max_per_img detections with "
             f"masks), resize scale {b.get('resize_scale')}, test_cfg max_per_img {b.get('max_per_img')}, RPN "
             f"{b.get('rpn_max_per_img')}; batches of up to {b.get('max_batch_size')}, batch delay 0.",
             f"- Backend in-process: {facts.get('backend', '?')}; served: {facts.get('served_backend', '?')}; "
             f"{facts.get('threads', '?')} intra-op thread(s) on both sides, one served worker.",
             f"- Each run: {b.get('images_per_run')} images at concurrency {b.get('concurrency')} (closed loop), "
             f"after {b.get('warmup_images')} unmeasured images per side; {b.get('rounds')} rounds, in-process first in odd rounds and "
             "served first in even ones. The served side is loaded by detserve's asyncio client over REST "
             "(about one request per second: its CPU is negligible) and answers with every mask as RLE in JSON.",
             ]
    stages = [(r["label"], r["extra"].get("stage_ms"), r["extra"].get("mean_batch")) for r in rows
              if r["extra"].get("stage_ms")]
    if stages:
        lines += ["", "In-process time per image by stage (ms; inference and preprocess are per batch, shared by its images):", ""]
        lines += [f"- {label} (mean batch {mb}): " + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
                  for label, st, mb in stages]
    return "\n".join(lines) + "\n"
