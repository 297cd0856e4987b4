"""`detserve bench report`: every figure of docs/benchmarks.md, measured side by side in one run.

Both systems run at once (idle servers cost nothing measurable) and are driven in alternation, so
a drift in machine load hits both. Order: serving overhead (null vs TorchServe no-op), rtmdet
served vs in-process, rtmdet vs TorchServe handlers, then eager vs ONNX Runtime in-process.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .corpus import describe, generated_corpus
from .inprocess import run_in_process
from .runner import LoadSpec, run_sweep
from .servers import ROOT, DetserveServer, NoopServer, set_affinity, write_model
from .setup import (busy_processes, load_predictor, machine_facts, model_variant, placement, toml_dumps,
                    versions)
from .stats import RunResult
from .targets import make_target


@dataclasses.dataclass
class ReportOptions:
    out: Path = ROOT / "docs" / "benchmarks.md"
    json_out: Path | None = ROOT / "bench" / "results" / "latest.json"
    model_dir: Path = ROOT / "models" / "rtmdet"
    quick: bool = False
    placement: str = "split"
    torchserve: bool = True
    onnx: bool = True
    wrk: bool = True
    duration_s: float = 8.0  # null model / no-op runs: thousands of requests
    model_duration_s: float = 15.0  # rtmdet runs: a batch of 8 takes about a second on one core
    warmup_s: float = 2.0
    ts_warmup_s: float = 60.0
    rounds: int = 2

    def __post_init__(self):
        if self.quick:
            self.duration_s, self.model_duration_s, self.warmup_s, self.ts_warmup_s, self.rounds = 3.0, 4.0, 1.0, 8.0, 1


class Recorder:
    """Collects results by section with the command that reproduces each."""

    def __init__(self):
        self.start = time.monotonic()
        self.sections: dict[str, list[dict]] = {}

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def add(self, section: str, result: RunResult, command: str, system: str) -> RunResult:
        result.extra = {**result.extra, "command": command, "system": system}
        self.sections.setdefault(section, []).append(result.to_json())
        self.log(f"{section}: {result.label}: {result.throughput:.1f} req/s p50 {result.p50_ms:.2f} "
                 f"p99 {result.p99_ms:.2f} ms errors {result.errors or 0}")
        return result


def _pin_self(cpus: set[int] | None) -> None:
    """Every thread of this process (grpc and OpenMP threads too, not just the caller)."""
    set_affinity(os.getpid(), cpus)


def run_report(opts: ReportOptions) -> dict:
    rec = Recorder()
    place = placement(opts.placement)
    all_cpus = set(os.sched_getaffinity(0))
    facts = {"machine": machine_facts(), "versions": versions(), "busy_before": busy_processes(),
             "load_before": os.getloadavg(), "placement": place.describe(), "options": {
                 k: str(v) for k, v in dataclasses.asdict(opts).items()}}
    rec.log(f"placement {place.describe()}")
    corpus = generated_corpus(16, seed=0)
    facts["corpus"] = describe(corpus)
    tmp = Path(tempfile.mkdtemp(prefix="detserve-bench-"))
    try:
        store = tmp / "store"
        write_model(store, "null", toml_dumps({
            "name": "null", "arch": "null",
            "batch": {"max_batch_size": 8, "max_batch_delay_ms": 0.0}, "workers": {"threads": place.threads}}))
        model_variant(opts.model_dir, store, "rtmdet", workers={"threads": place.threads})
        model_variant(opts.model_dir, store, "rtmdet-d0", workers={"threads": place.threads},
                      batch={"max_batch_delay_ms": 0.0})
        facts["model_toml"] = (opts.model_dir / "model.toml").read_text()
        _measure_all(opts, rec, place, all_cpus, corpus, store, tmp, facts)
    finally:
        _pin_self(all_cpus)
        shutil.rmtree(tmp, ignore_errors=True)
    facts["load_after"] = os.getloadavg()
    facts["busy_after"] = busy_processes()
    facts["elapsed_s"] = round(time.monotonic() - rec.start, 1)
    return {"facts": facts, "sections": rec.sections}


def _measure_all(opts, rec, place, all_cpus, corpus, store, tmp, facts) -> None:
    D, W = opts.duration_s, opts.warmup_s

    DM = opts.model_duration_s

    def spec(c: int, d: float, w: float = W) -> LoadSpec:
        return LoadSpec(concurrency=c, duration_s=d, warmup_s=w, progress=sys.stderr.isatty())

    def client_cpus(model: str) -> set[int] | None:
        # With the null model the worker core is nearly idle, so the load client runs there and
        # leaves the front core to the serving front (the same for both systems); with a real
        # model the worker core is saturated and the client shares the front core.
        if place.front_cpus is None:
            return None
        return place.worker_cpus if model in ("null", "noop") else place.front_cpus

    def served(section, system, kind, url, model, c, label, d=None, w=W, client="raw"):
        if d is None:
            d = D if model in ("null", "noop") else DM
        target = make_target(kind, url, model, corpus, client=client, pool_size=c)
        _pin_self(client_cpus(model) or all_cpus)
        try:
            result = asyncio.run(run_sweep(target, [spec(c, d, w)], label=label))[0]
        finally:
            _pin_self(place.front_cpus or all_cpus)
        result.label = label
        cmd = (f"detserve bench run --target {kind} --url {url if 'grpc' not in kind else url} --model {model} "
               f"--concurrency {c} --duration {d:g} --warmup {w:g}" + (" --client httpx" if client == "httpx" else ""))
        return rec.add(section, result, cmd, system)

    def served_rate(section, system, kind, url, model, rate, label):
        target = make_target(kind, url, model, corpus, pool_size=64)
        load = LoadSpec(concurrency=None, rate=rate, duration_s=DM, warmup_s=W, progress=sys.stderr.isatty())
        _pin_self(client_cpus(model) or all_cpus)
        try:
            result = asyncio.run(run_sweep(target, [load], label=label))[0]
        finally:
            _pin_self(place.front_cpus or all_cpus)
        result.label = label
        return rec.add(section, result, f"detserve bench run --target {kind} --url {url} --model {model} "
                       f"--rate {rate:g} --duration {DM:g} --warmup {W:g}", system)


    def wrk(section, system, url, model, c, label):
        from .wrk import available, run_wrk

        if not (opts.wrk and available()):
            return None
        d = D if model in ("null", "noop") else DM
        result = run_wrk(url, model, corpus, concurrency=c, duration_s=d, label=label, cpus=client_cpus(model))
        # wrk hangs up with requests still queued in the server; let them finish before the next run
        drain = make_target("rest", url, model, corpus[:1])
        asyncio.run(run_sweep(drain, [LoadSpec(concurrency=1, requests=1, duration_s=None, warmup_s=0,
                                               timeout_s=300, progress=False)]))
        return rec.add(section, result, f"wrk -t1 -c{c} -d{d:g}s --latency -s put.lua {url}  (PUT /predictions/{model})",
                       system)

    predictor_box: dict = {}

    def in_process(section, c, label, d=DM, model_dir=None, max_batch=None, key="rtmdet"):
        _pin_self(place.worker_cpus)
        try:
            if key not in predictor_box:
                predictor_box[key] = load_predictor(model_dir or store / "rtmdet", place.threads)
            pred = predictor_box[key]
            mb = max_batch or pred.cfg.batch.max_batch_size
            result = run_in_process(pred, corpus, concurrency=c, max_batch_size=mb, duration_s=d, warmup_s=W,
                                    label=label, progress=sys.stderr.isatty())
        finally:
            _pin_self(place.front_cpus or all_cpus)
        return rec.add(section, result, f"detserve bench in-process {key} --concurrency {c} --max-batch-size {mb} "
                       f"--threads {place.threads} --duration {d:g}", "in-process")

    ts_ctx = None
    if opts.torchserve:
        from .torchserve import TorchServe, TsModel, torchserve_version

        ts_ctx = TorchServe(tmp / "torchserve", store / "rtmdet",
                            [TsModel("noop", "noop"), TsModel("mmdet", "mmdet_style"),
                             TsModel("batched", "batched", batch_size=8, max_batch_delay_ms=50)],
                            threads=place.threads, front_cpus=place.front_cpus, worker_cpus=place.worker_cpus)
    rec.log("starting detserve")
    _pin_self(place.front_cpus)
    with DetserveServer(store, ["null", "rtmdet", "rtmdet-d0"], front_cpus=place.front_cpus,
                        worker_cpus=place.worker_cpus) as ds:
        ts = None
        if ts_ctx is not None:
            rec.log("starting TorchServe (3 models)")
            try:
                ts = ts_ctx.start()
                facts["versions"]["torchserve"] = torchserve_version()
            except Exception as exc:  # noqa: BLE001 - the rest of the report still has value
                facts["torchserve_error"] = f"{type(exc).__name__}: {exc}"
                rec.log(f"TorchServe failed: {exc}")
                ts_ctx.stop()
                ts = None
        try:
            _overhead(rec, ds, ts, served, wrk, opts, place)
            _rtmdet(rec, ds, served, served_rate, wrk, in_process, opts)
            if ts is not None:
                _vs_torchserve(rec, ds, ts, served, wrk, opts)
        finally:
            if ts is not None:
                ts.stop()
    for pred in predictor_box.values():
        pred.close()
    predictor_box.clear()
    if opts.onnx:
        _onnx(rec, store, tmp, in_process, facts, opts)


def _overhead(rec, ds, ts, served, wrk, opts, place) -> None:
    S = "overhead"
    if ts is not None:
        rec.log(f"warming TorchServe no-op for {opts.ts_warmup_s:g} s")
        served("warmup", "torchserve", "rest", ts.url, "noop", 16, "TorchServe no-op warm-up", d=opts.ts_warmup_s, w=0)
    served("warmup", "detserve", "rest", ds.url, "null", 16, "detserve null warm-up", d=5, w=0)
    for r in range(opts.rounds):
        served(S, "detserve", "rest", ds.url, "null", 16, f"detserve null REST c16 #{r + 1}")
        if ts is not None:
            served(S, "torchserve", "rest", ts.url, "noop", 16, f"TorchServe no-op c16 #{r + 1}")
    with NoopServer(place.front_cpus) as noop:
        served(S, "reference", "rest", noop.url, "null", 16, "bare FastAPI no-op c16 (reference)")
    wrk(S, "detserve", ds.url, "null", 16, "wrk: detserve null c16")
    if ts is not None:
        wrk(S, "torchserve", ts.url, "noop", 16, "wrk: TorchServe no-op c16")
    C = "client"
    served(C, "detserve", "grpc", ds.grpc_address, "null", 16, "detserve null gRPC Detect c16")
    served(C, "detserve", "kserve-grpc", ds.grpc_address, "null", 16, "detserve null KServe gRPC c16")
    served(C, "detserve", "kserve-rest", ds.url, "null", 16, "detserve null KServe REST (raw) c16")
    served(C, "detserve", "rest", ds.url, "null", 64, "detserve null REST c64")
    served(C, "detserve", "rest", ds.url, "null", 16, "detserve null REST c16, httpx client", client="httpx")


def _rtmdet(rec, ds, served, served_rate, wrk, in_process, opts) -> None:
    S = "rtmdet"
    served("warmup", "detserve", "rest", ds.url, "rtmdet", 16, "detserve rtmdet warm-up", d=3, w=0)
    for r in range(opts.rounds):
        in_process(S, 16, f"in-process rtmdet c16 #{r + 1}")
        served(S, "detserve", "rest", ds.url, "rtmdet", 16, f"detserve rtmdet REST c16 #{r + 1}")
        served(S, "detserve", "grpc", ds.grpc_address, "rtmdet", 16, f"detserve rtmdet gRPC c16 #{r + 1}")
    wrk(S, "detserve", ds.url, "rtmdet", 16, "wrk: detserve rtmdet c16")
    L = "latency"
    d1 = max(3.0, opts.model_duration_s * 2 / 3)  # one image at a time: many samples per second
    in_process(L, 1, "in-process rtmdet c1", d=d1)
    served(L, "detserve", "rest", ds.url, "rtmdet-d0", 1, "detserve rtmdet REST c1, batch delay 0", d=d1)
    served(L, "detserve", "grpc", ds.grpc_address, "rtmdet-d0", 1, "detserve rtmdet gRPC c1, batch delay 0", d=d1)
    served(L, "detserve", "rest", ds.url, "rtmdet", 1, "detserve rtmdet REST c1, bundled delay", d=d1)
    W = "sweep"
    for c in (1, 4, 16, 64):
        served(W, "detserve", "rest", ds.url, "rtmdet", c, f"detserve rtmdet REST c{c}", d=max(3.0, opts.model_duration_s / 2))
    # open loop at 70% of the closed-loop c16 throughput: latency under a steady, not saturating, load
    measured = [r["throughput"] for r in rec.sections.get(S, []) if r["label"].startswith("detserve rtmdet REST c16")]
    if measured and max(measured) > 0:
        rate = round(0.7 * sum(measured) / len(measured), 1)
        served_rate(W, "detserve", "rest", ds.url, "rtmdet", rate, f"detserve rtmdet REST open loop {rate:g}/s")


def _vs_torchserve(rec, ds, ts, served, wrk, opts) -> None:
    S = "torchserve"
    served("warmup", "torchserve", "rest", ts.url, "mmdet", 16, "TorchServe mmdet-style warm-up", d=5, w=0)
    served("warmup", "torchserve", "rest", ts.url, "batched", 16, "TorchServe batched warm-up", d=5, w=0)
    for r in range(opts.rounds):
        served(S, "detserve", "rest", ds.url, "rtmdet", 16, f"detserve rtmdet REST c16 #{r + 1}")
        served(S, "torchserve", "rest", ts.url, "mmdet", 16, f"TorchServe mmdet-style c16 #{r + 1}")
        served(S, "torchserve", "rest", ts.url, "batched", 16, f"TorchServe batched (8, 50 ms) c16 #{r + 1}")
    wrk(S, "torchserve", ts.url, "mmdet", 16, "wrk: TorchServe mmdet-style c16")
    d1 = max(3.0, opts.model_duration_s * 2 / 3)
    served(S, "torchserve", "rest", ts.url, "mmdet", 1, "TorchServe mmdet-style c1", d=d1)
    served(S, "torchserve", "rest", ts.url, "batched", 1, "TorchServe batched (8, 50 ms) c1", d=d1)


def _onnx(rec, store, tmp, in_process, facts, opts) -> None:
    try:
        from ..backends.onnxrt import OnnxRuntimeBackend  # noqa: F401
        from ..export.onnx_export import export_onnx
        from ..settings import load_model_config
    except ImportError as exc:
        facts["onnx_skipped"] = f"ONNX Runtime backend or exporter not available: {exc}"
        rec.log(facts["onnx_skipped"])
        return
    try:
        folder = model_variant(store / "rtmdet", tmp / "onnx-store", "rtmdet-onnx", backend="onnxruntime",
                               onnxruntime={"model": "model.onnx", "providers": ["cpu"]})
        rec.log("exporting rtmdet to ONNX")
        export_onnx(load_model_config(folder), out=folder / "model.onnx")
    except Exception as exc:  # noqa: BLE001
        facts["onnx_skipped"] = f"export failed: {type(exc).__name__}: {exc}"
        rec.log(facts["onnx_skipped"])
        return
    d = max(3.0, opts.model_duration_s / 3)
    for b in (1, 4, 8):
        in_process("onnx", b, f"eager batch {b}", d=d, max_batch=b, key="rtmdet")
        try:
            in_process("onnx", b, f"onnxruntime batch {b}", d=d, max_batch=b, model_dir=folder, key="rtmdet-onnx")
        except Exception as exc:  # noqa: BLE001
            facts["onnx_skipped"] = f"ONNX Runtime run failed: {type(exc).__name__}: {exc}"
            rec.log(facts["onnx_skipped"])
            return


def write_report(data: dict, opts: ReportOptions) -> None:
    from .render import render_markdown

    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(render_markdown(data, opts))
