"""`detserve bench report`: every figure of docs/benchmarks.md, measured side by side in one run.

What is compared is what a user gets: detserve *as shipped* (the bundled model.toml, default
backend and thread placement, default log level, nothing pinned) against TorchServe 0.12 at its
best: its own defaults (a worker per logical CPU, torch's own thread count) and every variant of
workers x threads that could be faster; each ratio uses the fastest TorchServe variant measured.
The two limits are measured in the same run: a bare FastAPI no-op (the Python HTTP floor) and the
in-process pipeline with the same backend and threads as the served worker (the model ceiling).

Systems are driven in alternation (detserve, then a TorchServe variant, round after round), so a
drift in machine load hits both. A pinned front/worker split is kept as an extra table.
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
from .setup import (busy_processes, cpu_times, machine_facts, model_variant, placement, steal_share, toml_dumps, versions,
                    wait_for_quiet)
from .stats import RunResult
from .targets import make_target

CACHE_ENV = "DETSERVE_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class TsVariant:
    """One TorchServe configuration: `threads=None` is TorchServe's own (torch picks every core)."""

    key: str
    workers: int
    threads: int | None

    @property
    def title(self) -> str:
        threads = "default threads" if self.threads is None else f"{self.threads} thread(s)"
        return f"{self.workers} worker(s), {threads}"


def ts_variants(cores: int) -> list[TsVariant]:
    """TorchServe's default (a worker per logical CPU, unset threads) first, then the tuned ones."""
    out = [TsVariant("default", cores, None), TsVariant("1w-1t", 1, 1), TsVariant(f"1w-{cores}t", 1, cores)]
    if cores > 1:
        out.append(TsVariant(f"{cores}w-1t", cores, 1))
    return list({v.key: v for v in out}.values())


@dataclasses.dataclass
class ReportOptions:
    out: Path = ROOT / "docs" / "benchmarks.md"
    json_out: Path | None = ROOT / "bench" / "results" / "latest.json"
    model_dir: Path = ROOT / "models" / "rtmdet"
    quick: bool = False
    torchserve: bool = True
    wrk: bool = True  # C load clients where installed: wrk (REST doors), h2load (gRPC doors)
    pinned: bool = True  # the extra pinned front/worker table
    two_stage: bool = True  # Mask R-CNN R-50 served vs in-process (service/bench/two_stage.py, ~4 min)
    duration_s: float = 8.0  # null model / no-op runs: thousands of requests
    model_duration_s: float = 12.0
    warmup_s: float = 2.0
    ts_warmup_s: float = 15.0  # per TorchServe variant: the JVM's JIT and the workers' first batches
    rounds: int = 2
    # The c1 pair (served vs in-process) gets more rounds: its difference is ~1 ms, and this VM's
    # speed moved its p50s by 5-7 ms from one 8 s round to the next (bench/analysis.md).
    latency_rounds: int = 6

    def __post_init__(self):
        if self.quick:
            self.duration_s, self.model_duration_s, self.warmup_s, self.ts_warmup_s, self.rounds = 3.0, 4.0, 1.0, 5.0, 1
            self.latency_rounds = 2


class Recorder:
    """Collects results by section with the command that reproduces each."""

    def __init__(self):
        self.start = time.monotonic()
        self.sections: dict[str, list[dict]] = {}
        self.cpu_start = self._cpu_mark = _cpu_times_or_none()

    def begin(self) -> None:
        """Mark the start of a run (its warm-up included): `add` reports the CPU time stolen since, so a
        server start or a drain between two runs is not charged to the second."""
        self._cpu_mark = _cpu_times_or_none()

    def log(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def add(self, section: str, result: RunResult, command: str, system: str, **extra) -> RunResult:
        # On a shared VM one run can lose a quarter of its CPU to other guests while its neighbours
        # lose none: recorded per run, so a reader can tell a slow run from a slow server.
        now = _cpu_times_or_none()
        steal = steal_share(self._cpu_mark, now)
        self._cpu_mark = now  # a run without `begin` (two_stage.py's) counts from the last one recorded
        result.extra = {**result.extra, "command": command, "system": system, **extra,
                        **({"steal": round(steal, 4)} if steal is not None else {})}
        self.sections.setdefault(section, []).append(result.to_json())
        self.log(f"{section}: {result.label}: {result.throughput:.1f} req/s p50 {result.p50_ms:.2f} "
                 f"p99 {result.p99_ms:.2f} ms errors {result.errors or 0}")
        return result


def _pin_self(cpus: set[int] | None) -> None:
    set_affinity(os.getpid(), cpus)


class Harness:
    """The measuring verbs, shared by every section."""

    def __init__(self, opts: ReportOptions, rec: Recorder, corpus: list[bytes]):
        self.opts, self.rec, self.corpus = opts, rec, corpus
        self.all_cpus = set(os.sched_getaffinity(0))
        self.client_cpus: set[int] | None = None  # only the pinned table pins the client
        self._predictors: dict[str, object] = {}

    def duration(self, model: str) -> float:
        return self.opts.duration_s if model in ("null", "noop") else self.opts.model_duration_s

    def served(self, section, system, kind, url, model, c, label, d=None, w=None, client="auto", metrics=None,
               **extra) -> RunResult:
        """REST runs use wrk and gRPC runs h2load where they are installed (gRPC runs also need the
        server's `metrics` URL, where h2load's errors are counted): a Python load client on the same 2
        cores takes CPU from the server it measures (measured: the raw asyncio client reached 0.46x of
        wrk's rate on the same null server), and a C client is what the issue's figures were taken with."""
        d = self.duration(model) if d is None else d
        w = self.opts.warmup_s if w is None else w
        self.rec.begin()
        if client == "auto":
            from . import h2load, wrk

            if kind in wrk.DOORS and self.opts.wrk and wrk.available():
                return self._served_wrk(section, system, url, model, c, label, d, w, kind=kind, **extra)
            if kind in ("grpc", "kserve-grpc") and self.opts.wrk and h2load.available() and metrics:
                result, cmd = h2load.run_h2load(url, kind, model, self.corpus, concurrency=c, duration_s=d,
                                                warmup_s=w, metrics_url=metrics, label=label, cpus=self.client_cpus)
                return self.rec.add(section, result, f"{cmd}  (one image of the corpus, its median size)",
                                    system, **extra)
            client = "raw"
        target = make_target(kind, url, model, self.corpus, client=client, pool_size=c)
        _pin_self(self.client_cpus or self.all_cpus)
        try:
            result = asyncio.run(run_sweep(target, [LoadSpec(concurrency=c, duration_s=d, warmup_s=w,
                                                             progress=sys.stderr.isatty())], label=label))[0]
        finally:
            _pin_self(self.all_cpus)
        result.label = label
        cmd = (f"detserve bench run --target {kind} --url {url} --model {model} --concurrency {c} "
               f"--duration {d:g} --warmup {w:g}" + (" --client httpx" if client == "httpx" else ""))
        return self.rec.add(section, result, cmd, system, **extra)

    def _served_wrk(self, section, system, url, model, c, label, d, w, kind="rest", **extra) -> RunResult:
        from .wrk import request_line, run_wrk

        if w > 0:
            run_wrk(url, model, self.corpus, concurrency=c, duration_s=w, label="warm-up", cpus=self.client_cpus,
                    kind=kind)
            self._drain(url, model)
        result = run_wrk(url, model, self.corpus, concurrency=c, duration_s=d, label=label, cpus=self.client_cpus,
                         kind=kind)
        self._drain(url, model)
        return self.rec.add(section, result, f"wrk -t1 -c{c} -d{d:g}s --latency -s {kind}.lua {url}  "
                            f"({request_line(kind, model)}, after {w:g} s of warm-up)", system, **extra)

    def _drain(self, url: str, model: str) -> None:
        """wrk hangs up with requests still queued in the server; let them finish before the next run."""
        drain = make_target("rest", url, model, self.corpus[:1])
        asyncio.run(run_sweep(drain, [LoadSpec(concurrency=1, requests=1, duration_s=None, warmup_s=0,
                                               timeout_s=300, progress=False)]))

    def in_process(self, section, model_dir: Path, threads: int, c: int, label: str, d=None, **extra) -> RunResult:
        from .setup import load_predictor

        key = f"{model_dir}:{threads}"
        if key not in self._predictors:
            self._predictors[key] = load_predictor(model_dir, threads)
        pred = self._predictors[key]
        self.rec.begin()
        mb = pred.cfg.batch.max_batch_size
        d = self.opts.model_duration_s if d is None else d
        result = run_in_process(pred, self.corpus, concurrency=c, max_batch_size=mb, duration_s=d,
                                warmup_s=self.opts.warmup_s, label=label, progress=sys.stderr.isatty())
        return self.rec.add(section, result, f"detserve bench in-process {model_dir.name} --concurrency {c} "
                            f"--max-batch-size {mb} --threads {threads} --duration {d:g}", "in-process",
                            backend=getattr(pred, "backend_name", "?"), threads=threads, **extra)

    def close(self) -> None:
        for pred in self._predictors.values():
            pred.close()
        self._predictors.clear()


def served_threads(model_dir: Path) -> int:
    """The intra-op threads a lone batch of this model runs on when served (the pool's functions): the
    in-process limit gets the same. For elastic workers that is every core, their share only under load."""
    from ..engine.pool import threads_per_worker
    from ..settings import load_model_config

    cfg = load_model_config(model_dir)
    share = threads_per_worker(cfg, cfg.workers.count)
    return cfg.workers.wide_threads(share) or share


def served_layout(model_dir: Path) -> str:
    """The model's workers in words, for the report's facts."""
    from ..engine.pool import threads_per_worker
    from ..settings import load_model_config

    cfg = load_model_config(model_dir)
    share = threads_per_worker(cfg, cfg.workers.count)
    wide = cfg.workers.wide_threads(share) if cfg.workers.count > 1 else 0
    layout = f"{cfg.workers.count} worker(s) of {share} intra-op thread(s)"
    return f"{layout}, {wide} for a batch that starts while the other workers are idle (elastic)" if wide else layout


def run_report(opts: ReportOptions) -> dict:
    rec = Recorder()
    facts = {"machine": machine_facts(), "versions": versions(), "busy_before": busy_processes(),
             "load_before": os.getloadavg(), "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()}}
    corpus = generated_corpus(16, seed=0)
    facts["corpus"] = describe(corpus)
    tmp = Path(tempfile.mkdtemp(prefix="detserve-bench-"))
    harness = Harness(opts, rec, corpus)
    old_cache = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp / "cache")  # a cold cache: the first start below exports
    try:
        store = tmp / "store"
        write_model(store, "null", toml_dumps({"name": "null", "arch": "null",
                                               "batch": {"max_batch_size": 8, "max_batch_delay_ms": 0.0}}))
        shipped = model_variant(opts.model_dir, store, "rtmdet")  # the bundled model.toml, unchanged
        facts["model_toml"] = (opts.model_dir / "model.toml").read_text()
        facts["served_threads"] = served_threads(shipped)
        facts["served_layout"] = served_layout(shipped)
        _measure_all(opts, rec, harness, corpus, store, tmp, facts)
        if opts.two_stage:
            harness.close()  # the rtmdet predictors' memory and threads, before a model 10x their size
            _two_stage(opts, rec, corpus, facts, old_cache)
    finally:
        harness.close()
        if old_cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old_cache
        shutil.rmtree(tmp, ignore_errors=True)
    facts["load_after"] = os.getloadavg()
    facts["steal_share"] = steal_share(rec.cpu_start, _cpu_times_or_none())
    facts["busy_after"] = busy_processes()
    facts["elapsed_s"] = round(time.monotonic() - rec.start, 1)
    facts["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # the doc's date, whenever rendered
    return {"facts": facts, "sections": rec.sections}


def _cpu_times_or_none() -> list[int] | None:
    try:
        return cpu_times()
    except (OSError, ValueError):  # no /proc (not Linux): the report says nothing of steal
        return None


def _start_timed(store: Path, models: list[str], **kwargs) -> tuple[DetserveServer, float]:
    started = time.monotonic()
    server = DetserveServer(store, models, **kwargs).start()
    return server, time.monotonic() - started


def _measure_all(opts, rec, h: Harness, corpus, store, tmp, facts) -> None:
    threads = facts["served_threads"]
    cores = len(h.all_cpus)
    rec.log("first start of detserve (cold export cache)")
    ds, first_s = _start_timed(store, ["null", "rtmdet"], log_level=None)
    facts["start_first_s"] = round(first_s, 1)
    ds.stop()
    ds, second_s = _start_timed(store, ["null", "rtmdet"], log_level=None)
    facts["start_second_s"] = round(second_s, 1)
    rec.log(f"start times: first {first_s:.1f} s, second {second_s:.1f} s")
    try:
        facts["shipped_backend"] = _describe_backend(ds, "rtmdet")
        ts_list = ts_variants(cores) if opts.torchserve else []
        _limits_and_shipped(opts, rec, h, ds, store, threads)
        for variant in ts_list:
            _torchserve_round(opts, rec, h, ds, store, tmp, facts, variant)
        _doors(rec, h, ds)
    finally:
        ds.stop()
    _placement(opts, rec, h, store, cores)
    _eager(opts, rec, h, store, threads)
    if opts.pinned and opts.torchserve and cores >= 2:
        _pinned(opts, rec, h, store, tmp, facts)


def _two_stage(opts, rec, corpus, facts, user_cache: str | None) -> None:
    """The user's export cache, not the report's cold one: exporting and checking the three Mask R-CNN
    graphs takes minutes on a small machine, and the section measures serving, not start-up."""
    from .two_stage import TwoStageBench, bench_store, run_two_stage

    bench = TwoStageBench(rounds=1, images_per_run=8) if opts.quick else TwoStageBench()
    cold = os.environ.pop(CACHE_ENV, None)
    if user_cache is not None:
        os.environ[CACHE_ENV] = user_cache
    try:
        waited = wait_for_quiet()
        rec.log(f"two-stage: waited {waited:.0f} s for the machine to be quiet")
        facts["two_stage"] = run_two_stage(rec, bench_store(bench), corpus, bench)
    except Exception as exc:  # noqa: BLE001 - the rest of the report still has value
        facts["two_stage_error"] = f"{type(exc).__name__}: {exc}"
        rec.log(f"two-stage section failed: {exc}")
    finally:
        os.environ.pop(CACHE_ENV, None)
        if cold is not None:
            os.environ[CACHE_ENV] = cold


def _describe_backend(ds: DetserveServer, model: str) -> dict:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ds.mgmt_port}/models/{model}", timeout=10) as r:
            body = json.loads(r.read())
        entry = body[0] if isinstance(body, list) else body
        return {k: entry.get(k) for k in ("backend", "backendReason", "devices") if k in entry}
    except Exception as exc:  # noqa: BLE001 - a fact for the report, never a reason to stop
        return {"error": str(exc)}


def _limits_and_shipped(opts, rec, h: Harness, ds, store, threads) -> None:
    h.served("warmup", "detserve", "rest", ds.url, "null", 16, "detserve null warm-up", d=3, w=0)
    h.served("warmup", "detserve", "rest", ds.url, "rtmdet", 16, "detserve rtmdet warm-up", d=3, w=0)
    # Each pair of runs goes A, B in even rounds and B, A in odd ones, so a drift of the machine's
    # speed within a round falls on both sides alike.
    def alternate(r: int, *runs):
        for run in (runs if r % 2 == 0 else runs[::-1]):
            run()

    with NoopServer() as noop:
        for r in range(opts.rounds):
            alternate(r,
                      lambda: h.served("overhead", "reference", "rest", noop.url, "null", 16, f"bare FastAPI no-op c16 #{r + 1}"),
                      lambda: h.served("overhead", "detserve", "rest", ds.url, "null", 16, f"detserve null REST c16 #{r + 1}"))
    for r in range(opts.rounds):
        alternate(r,
                  lambda: h.in_process("shipped", store / "rtmdet", threads, 16, f"in-process rtmdet c16 #{r + 1}"),
                  lambda: h.served("shipped", "detserve", "rest", ds.url, "rtmdet", 16, f"detserve rtmdet REST c16 #{r + 1}"))
    d1 = max(3.0, opts.model_duration_s * 2 / 3)
    for r in range(opts.latency_rounds):
        alternate(r,
                  lambda: h.in_process("latency", store / "rtmdet", threads, 1, f"in-process rtmdet c1 #{r + 1}", d=d1),
                  lambda: h.served("latency", "detserve", "rest", ds.url, "rtmdet", 1, f"detserve rtmdet REST c1 #{r + 1}",
                                   d=d1))
        h.served("latency", "detserve", "grpc", ds.grpc_address, "rtmdet", 1, f"detserve rtmdet gRPC c1 #{r + 1}", d=d1,
                 metrics=ds.metrics_url)


def _torchserve_round(opts, rec, h: Harness, ds, store, tmp, facts, variant: TsVariant) -> None:
    from .torchserve import TorchServe, TsModel, torchserve_version

    rec.log(f"starting TorchServe: {variant.title}")
    ts = TorchServe(tmp / f"torchserve-{variant.key}", store / "rtmdet",
                    [TsModel("noop", "noop"), TsModel("mmdet", "mmdet_style"),
                     TsModel("batched", "batched", batch_size=8, max_batch_delay_ms=50)],
                    threads=variant.threads, workers=variant.workers)
    try:
        ts.start()
        facts["versions"]["torchserve"] = torchserve_version()
    except Exception as exc:  # noqa: BLE001 - the rest of the report still has value
        facts.setdefault("torchserve_errors", {})[variant.key] = f"{type(exc).__name__}: {exc}"
        rec.log(f"TorchServe {variant.key} failed: {exc}")
        ts.stop()
        return
    tag = {"ts_variant": variant.key}
    try:
        h.served("warmup", "torchserve", "rest", ts.url, "noop", 16, f"TorchServe no-op warm-up ({variant.key})",
                 d=opts.ts_warmup_s / 3, w=0)
        h.served("warmup", "torchserve", "rest", ts.url, "mmdet", 16, f"TorchServe mmdet warm-up ({variant.key})",
                 d=opts.ts_warmup_s / 3, w=0)
        h.served("warmup", "torchserve", "rest", ts.url, "batched", 16,
                 f"TorchServe batched warm-up ({variant.key})", d=opts.ts_warmup_s / 3, w=0)
        # detserve right before each TorchServe variant: load drift hits both
        h.served("overhead", "detserve", "rest", ds.url, "null", 16, f"detserve null REST c16 (before {variant.key})")
        h.served("overhead", "torchserve", "rest", ts.url, "noop", 16, f"TorchServe no-op c16, {variant.title}", **tag)
        h.served("torchserve", "detserve", "rest", ds.url, "rtmdet", 16, f"detserve rtmdet REST c16 (before {variant.key})")
        h.served("torchserve", "torchserve", "rest", ts.url, "mmdet", 16, f"TorchServe mmdet-style c16, {variant.title}", **tag)
        h.served("torchserve", "torchserve", "rest", ts.url, "batched", 16,
                 f"TorchServe batched (8, 50 ms) c16, {variant.title}", **tag)
        d1 = max(3.0, opts.model_duration_s / 2)
        h.served("torchserve", "torchserve", "rest", ts.url, "mmdet", 1, f"TorchServe mmdet-style c1, {variant.title}",
                 d=d1, **tag)
    finally:
        ts.stop()


def _doors(rec, h: Harness, ds) -> None:
    """Each door with a C load client (wrk, h2load) where installed, and with the Python client."""
    C, m = "client", ds.metrics_url
    h.served(C, "detserve", "rest", ds.url, "null", 16, "detserve null REST c16, Python asyncio client", client="raw")
    h.served(C, "detserve", "kserve-rest", ds.url, "null", 16, "detserve null KServe REST (raw) c16")
    h.served(C, "detserve", "kserve-rest", ds.url, "null", 16, "detserve null KServe REST (raw) c16, Python asyncio client",
             client="raw")
    h.served(C, "detserve", "grpc", ds.grpc_address, "null", 16, "detserve null gRPC Detect c16", metrics=m)
    h.served(C, "detserve", "grpc", ds.grpc_address, "null", 16, "detserve null gRPC Detect c16, Python asyncio client",
             client="raw")
    h.served(C, "detserve", "kserve-grpc", ds.grpc_address, "null", 16, "detserve null KServe gRPC c16", metrics=m)
    h.served(C, "detserve", "kserve-grpc", ds.grpc_address, "null", 16,
             "detserve null KServe gRPC c16, Python asyncio client", client="raw")
    h.served(C, "detserve", "rest", ds.url, "null", 64, "detserve null REST c64")


def _placement(opts, rec, h: Harness, store, cores: int) -> None:
    """The measurement behind the default thread placement (WorkerConfig.threads_per_worker and
    wide_threads, and the bundled rtmdet's two workers): fixed layouts beside two elastic workers, in
    two alternating rounds (one round of a layout swings by a quarter on a shared VM)."""
    if cores < 2:
        return
    # (workers, fixed threads or 0 for elastic)
    layouts = [(1, 1), (1, cores), (2, 1)] + ([(2, cores // 2)] if cores >= 4 else []) + [(2, 0)]
    names = []
    for workers, threads in dict.fromkeys(layouts):
        if threads:
            name, title = f"rtmdet-{workers}w{threads}t", f"{workers} worker(s) x {threads} thread(s)"
        else:
            name = f"rtmdet-{workers}w-elastic"
            title = f"{workers} workers x {cores // workers} thread(s), {cores} while alone (elastic)"
        model_variant(store / "rtmdet", store, name, workers={"count": workers, "threads": threads, "elastic": not threads})
        names.append((name, title, workers, threads or cores // workers))
    with DetserveServer(store, [n for n, *_ in names], log_level=None) as ds:
        for name, *_ in names:
            h.served("warmup", "detserve", "rest", ds.url, name, 16, f"{name} warm-up", d=2, w=0)
        d = max(3.0, opts.model_duration_s / 2)
        for round_ in (1, 2):
            for name, title, workers, threads in names:
                tag = {"workers": workers, "threads": threads, "elastic": name.endswith("elastic")}
                h.served("placement", "detserve", "rest", ds.url, name, 16, f"rtmdet, {title}, c16 #{round_}",
                         d=d, **tag)
                h.served("placement", "detserve", "rest", ds.url, name, 1, f"rtmdet, {title}, c1 #{round_}",
                         d=d, **tag)


def _eager(opts, rec, h: Harness, store, threads) -> None:
    """The eager PyTorch path (GPU and eager users), served and in-process, same threads."""
    model_variant(store / "rtmdet", store, "rtmdet-eager", backend="eager")
    d = max(3.0, opts.model_duration_s * 2 / 3)
    with DetserveServer(store, ["rtmdet-eager"], log_level=None) as ds:
        h.served("warmup", "detserve", "rest", ds.url, "rtmdet-eager", 16, "rtmdet eager warm-up", d=2, w=0)
        h.in_process("eager", store / "rtmdet-eager", threads, 16, "in-process rtmdet eager c16", d=d)
        h.served("eager", "detserve", "rest", ds.url, "rtmdet-eager", 16, "detserve rtmdet eager REST c16", d=d)
        h.in_process("eager", store / "rtmdet-eager", threads, 1, "in-process rtmdet eager c1", d=d)
        h.served("eager", "detserve", "rest", ds.url, "rtmdet-eager", 1, "detserve rtmdet eager REST c1", d=d)


def _pinned(opts, rec, h: Harness, store, tmp, facts) -> None:
    """Extra: the front (and load client) on one core, the model worker on the other, 1 thread each."""
    from .torchserve import TorchServe, TsModel

    place = placement("split")
    facts["pinned_placement"] = place.describe()
    model_variant(store / "rtmdet", store, "rtmdet-pinned", workers={"threads": place.threads, "count": 1})
    h.client_cpus = place.front_cpus
    d = max(3.0, opts.model_duration_s * 2 / 3)
    try:
        with DetserveServer(store, ["null", "rtmdet-pinned"], front_cpus=place.front_cpus,
                            worker_cpus=place.worker_cpus, log_level=None) as ds:
            h.served("warmup", "detserve", "rest", ds.url, "rtmdet-pinned", 16, "pinned detserve warm-up", d=2, w=0)
            h.served("pinned", "detserve", "rest", ds.url, "null", 16, "pinned: detserve null c16", d=d)
            h.served("pinned", "detserve", "rest", ds.url, "rtmdet-pinned", 16, "pinned: detserve rtmdet c16", d=d)
        ts = TorchServe(tmp / "torchserve-pinned", store / "rtmdet",
                        [TsModel("noop", "noop"), TsModel("mmdet", "mmdet_style")], threads=place.threads,
                        workers=1, front_cpus=place.front_cpus, worker_cpus=place.worker_cpus)
        try:
            ts.start()
            h.served("warmup", "torchserve", "rest", ts.url, "mmdet", 16, "pinned TorchServe warm-up",
                     d=opts.ts_warmup_s, w=0)
            h.served("pinned", "torchserve", "rest", ts.url, "noop", 16, "pinned: TorchServe no-op c16", d=d)
            h.served("pinned", "torchserve", "rest", ts.url, "mmdet", 16, "pinned: TorchServe mmdet-style c16", d=d)
        except Exception as exc:  # noqa: BLE001
            facts.setdefault("torchserve_errors", {})["pinned"] = f"{type(exc).__name__}: {exc}"
        finally:
            ts.stop()
    finally:
        h.client_cpus = None


def write_report(data: dict, opts: ReportOptions) -> None:
    from .render import render_markdown

    if opts.json_out is not None:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(render_markdown(data, opts))
