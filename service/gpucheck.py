"""`make gpu-check` (python -m service.gpucheck): everything a briefly lent GPU machine should tell us, in one call.

Stages, each bounded by the time left of one budget (default 7.5 min) and each turning a failure
into a row instead of a crash:
  1. the gpu-marked tests (pytest -m gpu);
  2. parity against eager CPU fp32 for the bundled models: TensorRT EP fp16 / fp32, CUDA EP (the
     backend = "auto" gate, whose verdicts land in a temporary cache), eager CUDA fp32 / fp16;
  3. a short benchmark of rtmdet: in-process batch 1 and 8 for each variant, then `detserve serve`
     (backend auto, reusing the cache) at concurrency 1 and 8;
  4. `detserve bench tiles` on the GPU (issue 18's batched tiles vs one by one: on a 2-core CPU a
     batch of 8 costs about 8 singles, so the figure that shows batching is this one);
and prints ONE table. Without a CUDA device it says so and exits 2.

On a machine with CUDA and torch but no serving stack and no network (a lent GPU box), carry the
wheels from `make gpu-wheels` and run `python3 -m service.gpucheck --wheels .whl` (service/gpu_wheels.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("rtmdet", "rtmdet-ins")
NO_GPU_EXIT = 2
SITE_ENV = "DETSERVE_GPUCHECK_SITE"  # set once the carried wheels are installed: what and where


@dataclass
class Row:
    stage: str  # tests | parity | bench-inproc | bench-served | bench-tiles | info
    model: str
    variant: str
    result: str  # PASS / FAIL / SKIP / ERROR, or a figure
    detail: str = ""


class Budget:
    """One deadline for the whole check; stages ask how long they may still take."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self._clock = clock
        self.deadline = clock() + total_s

    def left(self) -> float:
        return max(0.0, self.deadline - self._clock())

    def allows(self, needed_s: float) -> bool:
        return self.left() >= needed_s


def render_table(rows: list[Row]) -> str:
    """A fixed-width table, one line per row, widths from the content."""
    header = Row("stage", "model", "variant", "result", "detail")
    cells = [[r.stage, r.model, r.variant, r.result, r.detail] for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(c[i].ljust(widths[i]) for i in range(4)) + ("  " + c[4] if c[4] else ""))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ------")
    return "\n".join(lines)


def parse_pytest_summary(output: str) -> str:
    """'3 passed, 1 skipped in 12.3s' from pytest -q output (the last summary line), else 'no summary'."""
    for line in reversed(output.strip().splitlines()):
        text = line.strip("= ").strip()
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", text) and " in " in text:
            return text
    return "no summary"


def no_gpu_reason() -> str | None:
    """Why there is no usable CUDA device here (None: there is one). Never raises."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return f"torch cannot be imported: {exc}"
    try:
        if not torch.cuda.is_available():
            return (f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False; "
                    f"CUDA build {torch.version.cuda or 'none'}). Run `detserve doctor` for the driver/toolkit details.")
    except Exception as exc:  # noqa: BLE001
        return f"CUDA probe failed: {exc}"
    return None


# --- stage 1: tests -------------------------------------------------------------------------------


def run_gpu_tests(budget: Budget, rows: list[Row], cache: Path) -> None:
    timeout = min(180.0, budget.left() - 270)  # leave most of the budget to parity and the benchmark
    if timeout < 30:
        rows.append(Row("tests", "-", "pytest -m gpu", "SKIP", "no time left"))
        return
    # A module that cannot even be imported there must cost its own tests, not the whole stage.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           str(REPO / "tests")]
    start = time.monotonic()
    try:
        # the tests' auto loads share the check's cache, so the parity stage reuses their TensorRT builds
        env = {**os.environ, "DETSERVE_CACHE_DIR": str(cache)}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        summary = parse_pytest_summary(proc.stdout + proc.stderr)
        failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        rows.append(Row("tests", "-", "pytest -m gpu", "PASS" if proc.returncode == 0 else "FAIL",
                        summary + (f"; {'; '.join(failed[:3])}" if failed else "")))
    except subprocess.TimeoutExpired:
        rows.append(Row("tests", "-", "pytest -m gpu", "ERROR", f"timed out after {time.monotonic() - start:.0f} s"))


# --- stage 2: parity --------------------------------------------------------------------------------


def _predict_all(cfg, device: str, images):
    from .pipeline.predictor import Predictor
    from .types import DetectOptions, DetectResult, RawImage

    inputs = [RawImage(pixels=i.tobytes(), height=i.shape[0], width=i.shape[1], channel_order="BGR") for i in images]
    predictor = Predictor.from_config(cfg, device=device)
    try:
        out = predictor.predict(inputs, [DetectOptions(score_thr=0.0)] * len(inputs))
    finally:
        predictor.close()
    bad = [r for r in out if not isinstance(r, DetectResult)]
    if bad:
        raise RuntimeError(str(bad[0]))
    return out


def run_parity(budget: Budget, rows: list[Row], cache: Path, device: str = "cuda:0") -> dict[str, list]:
    """Parity rows per model and candidate; returns the ORT candidates that passed, per model."""
    from .backends import auto
    from .detectors.checkpoint import load_checkpoint, num_classes_in
    from .export.parity import compare_results, shape_images
    from .settings import load_model_config

    passed: dict[str, list] = {}
    for name in MODELS:
        folder = REPO / "models" / name
        if not (folder / "model.toml").is_file():
            rows.append(Row("parity", name, "-", "SKIP", "model not shipped"))
            continue
        cfg = load_model_config(folder)
        checkpoint = load_checkpoint(cfg.path(cfg.weights))
        entry = auto.entry_dir(cfg, auto.cache_key(cfg, num_classes_in(checkpoint.state_dict) or len(cfg.classes or ())), cache)
        entry.mkdir(parents=True, exist_ok=True)
        passed[name] = []
        import onnxruntime as ort

        from .backends.onnxrt import provider_problem

        runnable, skipped = auto.candidates_for(device, ort.get_available_providers(), provider_problem)
        for why in skipped:
            rows.append(Row("parity", name, f"ort {why.split(':')[0]}", "SKIP", why))
        for cand in runnable:
            if not budget.allows(150):
                rows.append(Row("parity", name, f"ort {cand.label}", "SKIP", "no time left"))
                continue
            start = time.monotonic()
            try:
                with auto.entry_lock(entry):
                    verdict = auto.candidate_verdict(cfg, device, cand, entry, checkpoint)
                rows.append(Row("parity", name, f"ort {cand.label}", "PASS" if verdict.passed else "FAIL",
                                f"{verdict.summary} ({time.monotonic() - start:.0f} s)"))
                if verdict.passed:
                    passed[name].append(cand)
            except Exception as exc:  # noqa: BLE001
                rows.append(Row("parity", name, f"ort {cand.label}", "ERROR", f"{type(exc).__name__}: {exc}"))
        images = shape_images(auto.PARITY_IMAGES)
        try:
            reference = _predict_all(auto.eager_cfg(cfg), "cpu", images)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row("parity", name, "eager cpu (reference)", "ERROR", f"{type(exc).__name__}: {exc}"))
            continue
        for fp16 in (False, True):
            variant = f"eager {device.split(':')[0]} {'fp16' if fp16 else 'fp32'}"
            if not budget.allows(140):
                rows.append(Row("parity", name, variant, "SKIP", "no time left"))
                continue
            try:
                eager = auto.eager_cfg(cfg).model_copy(update={"eager": cfg.eager.model_copy(update={"fp16": fp16})})
                report = compare_results(reference, _predict_all(eager, device, images), auto.PARITY_SCORE_THR)
                ok = report.reference > 0 and report.ok(auto.PARITY_MAX_BOX_PX, auto.PARITY_MAX_SCORE)
                rows.append(Row("parity", name, variant, "PASS" if ok else "FAIL",
                                f"{report.matched}/{report.reference} matched, box max {report.max_box_diff:.3f} px, "
                                f"score max {report.max_score_diff:.1e} (vs eager cpu fp32)"))
            except Exception as exc:  # noqa: BLE001
                rows.append(Row("parity", name, variant, "ERROR", f"{type(exc).__name__}: {exc}"))
    return passed


# --- stage 3: benchmark -----------------------------------------------------------------------------


def _inprocess_ips(cfg, image: bytes, batch: int, seconds: float, device: str = "cuda:0") -> tuple[float, float]:
    """(images/s, ms per batch, median) for Predictor.predict on `batch` copies of `image`."""
    import torch

    from .pipeline.predictor import Predictor
    from .types import DetectOptions, EncodedImage

    predictor = Predictor.from_config(cfg, device=device)
    try:
        images, options = [EncodedImage(image)] * batch, [DetectOptions()] * batch
        for _ in range(3):
            predictor.predict(images, options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times, end = [], time.monotonic() + seconds
        while time.monotonic() < end or len(times) < 5:
            start = time.perf_counter()
            predictor.predict(images, options)
            times.append(time.perf_counter() - start)
    finally:
        predictor.close()
    times.sort()
    median = times[len(times) // 2]
    return batch / median, median * 1000


def run_inprocess_bench(budget: Budget, rows: list[Row], cache: Path, passed: dict[str, list],
                        device: str = "cuda:0", seconds: float = 3.0) -> None:
    from .backends import auto
    from .detectors.checkpoint import load_checkpoint, num_classes_in
    from .settings import load_model_config

    name = "rtmdet"
    folder = REPO / "models" / name
    if not (folder / "demo.jpg").is_file():
        rows.append(Row("bench-inproc", name, "-", "SKIP", "models/rtmdet/demo.jpg not shipped"))
        return
    cfg = load_model_config(folder)
    image = (folder / "demo.jpg").read_bytes()
    checkpoint = load_checkpoint(cfg.path(cfg.weights))
    entry = auto.entry_dir(cfg, auto.cache_key(cfg, num_classes_in(checkpoint.state_dict) or len(cfg.classes or ())), cache)
    def eager(**options):
        return auto.eager_cfg(cfg).model_copy(update={"eager": cfg.eager.model_copy(update=options)})

    # channels-last is off by default on CUDA until these rows say it is faster (backends/eager.py)
    variants = [("eager fp32", eager(channels_last=False)), ("eager fp16", eager(fp16=True, channels_last=False)),
                ("eager fp32 channels-last", eager(channels_last=True)),
                ("eager fp16 channels-last", eager(fp16=True, channels_last=True))]
    for cand in passed.get(name, []):
        variants.append((f"ort {cand.label}", auto.onnx_cfg(cfg, entry / auto.ONNX_FILE, cand, entry)))
    for variant, vcfg in variants:
        for batch in (1, 8):
            if not budget.allows(40):
                rows.append(Row("bench-inproc", name, f"{variant} b{batch}", "SKIP", "no time left"))
                continue
            try:
                ips, ms = _inprocess_ips(vcfg, image, batch, seconds=seconds, device=device)
                rows.append(Row("bench-inproc", name, f"{variant} b{batch}", f"{ips:.1f} img/s", f"{ms:.2f} ms/batch (median)"))
            except Exception as exc:  # noqa: BLE001
                rows.append(Row("bench-inproc", name, f"{variant} b{batch}", "ERROR", f"{type(exc).__name__}: {exc}"))


def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float, int]:
    """(requests/s, p50 ms, errors): `concurrency` clients each with one request outstanding."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client():
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    ok = http.put(url, content=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return len(latencies) / elapsed, p50, errors[0]


def run_served_bench(budget: Budget, rows: list[Row], cache: Path, workdir: Path, seconds: float = 5.0) -> None:
    import httpx

    from .bench.servers import free_port, stop_process, wait_http

    folder = REPO / "models" / "rtmdet"
    if not budget.allows(30) or not (folder / "demo.jpg").is_file():
        rows.append(Row("bench-served", "rtmdet", "-", "SKIP", "no time left" if (folder / "demo.jpg").is_file() else "no demo.jpg"))
        return
    store = workdir / "store"
    store.mkdir(exist_ok=True)
    if not (store / "rtmdet").exists():
        from .bench.setup import model_variant

        # One worker: the comparison is one served pipeline against one in-process (the two the bundled
        # model ships are for CPUs, where an idle one lends its cores; on a GPU they would share it).
        model_variant(folder, store, "rtmdet", workers={"count": 1})
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    # `python -m service`, not the console script: a machine running from carried wheels has none.
    cmd = [sys.executable, "-m", "service", "serve", "--model-store", str(store), "--models", "rtmdet",
           "--host", "127.0.0.1", "--no-grpc", "--inference-port", str(ports["inference"]),
           "--management-port", str(ports["management"]), "--metrics-port", str(ports["metrics"])]
    env = {**os.environ, "DETSERVE_CACHE_DIR": str(cache)}
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{ports['inference']}"
        wait_http(f"{base}/readyz", timeout_s=max(5.0, min(100.0, budget.left() - 15)), proc=proc)
        info = httpx.get(f"http://127.0.0.1:{ports['management']}/models/rtmdet", timeout=10).json()
        info = info[0] if isinstance(info, list) else info
        rows.append(Row("bench-served", "rtmdet", "auto resolved to", info.get("backend", "?"), info.get("backendReason", "")))
        body = (folder / "demo.jpg").read_bytes()
        for concurrency in (1, 8):
            if not budget.allows(8):
                rows.append(Row("bench-served", "rtmdet", f"c{concurrency}", "SKIP", "no time left"))
                continue
            closed_loop(f"{base}/predictions/rtmdet", body, concurrency, 1.0)  # warm-up
            rps, p50, errors = closed_loop(f"{base}/predictions/rtmdet", body, concurrency, seconds)
            rows.append(Row("bench-served", "rtmdet", f"{info.get('backend', '?')} c{concurrency}", f"{rps:.1f} img/s",
                            f"p50 {p50:.1f} ms, {errors} errors (HTTP PUT of demo.jpg, closed loop)"))
    except Exception as exc:  # noqa: BLE001
        tail = log_path.read_text(errors="replace")[-600:].replace("\n", " | ")
        rows.append(Row("bench-served", "rtmdet", "-", "ERROR", f"{type(exc).__name__}: {exc}; log: {tail}"))
    finally:
        stop_process(proc, grace_s=20)


def run_tiles_bench(budget: Budget, rows: list[Row], cache: Path, device: str = "cuda:0") -> None:
    """One tiled 4000x3000 request (193 tiles of 320, batches of 8) against the same tiles one by one."""
    from .bench.tiles import bench_tiles

    if not budget.allows(90):
        rows.append(Row("bench-tiles", "rtmdet", "-", "SKIP", "no time left"))
        return
    dry = device == "cpu"
    previous = os.environ.get("DETSERVE_CACHE_DIR")
    os.environ["DETSERVE_CACHE_DIR"] = str(cache)  # the engine's workers reuse the parity stage's graphs
    try:
        result = bench_tiles(REPO / "models" / "rtmdet", None, device=device, rounds=1 if dry else 2,
                             generated_size=(960, 640) if dry else (4000, 3000))
        rows.append(Row("bench-tiles", "rtmdet", f"{result.backend} {result.width}x{result.height}, {result.tiles} items",
                        f"{result.speedup:.2f}x", f"batched {result.batched_s:.2f} s, one by one {result.one_by_one_s:.2f} s, "
                        f"batches of {result.max_batch_size}, median of {result.rounds}"))
    except Exception as exc:  # noqa: BLE001
        rows.append(Row("bench-tiles", "rtmdet", "-", "ERROR", f"{type(exc).__name__}: {exc}"))
    finally:
        if previous is None:
            os.environ.pop("DETSERVE_CACHE_DIR", None)
        else:
            os.environ["DETSERVE_CACHE_DIR"] = previous


# --- entry point ------------------------------------------------------------------------------------


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def run_with_wheels(src: Path, argv: list[str]) -> None:
    """Install the carried wheels, then run the check again in a fresh interpreter with them first on
    its path (modules imported before the install would otherwise shadow them). Does not return."""
    from .gpu_wheels import install_wheels

    site = Path(tempfile.gettempdir()) / "detserve-gpucheck-site"
    count = install_wheels(src, site)
    path = [str(site), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, SITE_ENV: f"{count} wheels from {src} in {site}", "PYTHONPATH": os.pathsep.join(path)}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "service.gpucheck", *_without_option(argv, "--wheels")], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450.0, help="total time for every stage (default 450)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--skip-tests", action="store_true", help="skip the pytest -m gpu stage")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run every stage but the tests on the CPU (short timings): checks this script without a GPU")
    parser.add_argument("--wheels", type=Path, help="first install the serving stack from these wheels (make gpu-wheels)")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR",
                        help="only download the wheels a bare GPU machine lacks into DIR, then exit")
    parser.add_argument("--python-version", default="3.12", help="with --fetch-wheels: that machine's Python (3.12)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        from .gpu_wheels import fetch_wheels

        wheels = fetch_wheels(args.fetch_wheels, args.python_version)
        size = sum(w.stat().st_size for w in wheels) / 2**20
        print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.fetch_wheels} (Python {args.python_version}); on the GPU "
              f"machine: python3 -m service.gpucheck --wheels {args.fetch_wheels}")
        return 0
    if args.wheels and SITE_ENV not in os.environ:
        run_with_wheels(args.wheels, argv)

    device, seconds = ("cpu", 0.5) if args.dry_run_cpu else ("cuda:0", None)
    if not args.dry_run_cpu:
        reason = no_gpu_reason()
        if reason is not None:
            carried = f" (serving stack: {os.environ[SITE_ENV]})" if SITE_ENV in os.environ else ""
            print(f"gpu-check: no GPU here, nothing was run: {reason}{carried}", file=sys.stderr)
            return NO_GPU_EXIT
    import torch

    budget = Budget(args.budget_s)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (dry run)"
    rows = [Row("info", "-", "device", name, f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"Python {sys.version.split()[0]}")]
    if SITE_ENV in os.environ:
        rows.append(Row("info", "-", "wheels", "installed", os.environ[SITE_ENV]))
    try:
        import onnxruntime as ort

        rows.append(Row("info", "-", "onnxruntime", ort.__version__, ", ".join(ort.get_available_providers())))
    except Exception as exc:  # noqa: BLE001
        rows.append(Row("info", "-", "onnxruntime", "ERROR", str(exc)))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="detserve-gpucheck-") as tmp:
        workdir = Path(tmp)
        cache = workdir / "cache"
        skip_tests = args.skip_tests or args.dry_run_cpu
        stages = [("tests", lambda: None if skip_tests else run_gpu_tests(budget, rows, cache))]
        passed: dict[str, list] = {}

        def parity():
            passed.update(run_parity(budget, rows, cache, device))

        stages += [("parity", parity),
                   ("bench-inproc", lambda: run_inprocess_bench(budget, rows, cache, passed, device, seconds or 3.0)),
                   ("bench-served", lambda: run_served_bench(budget, rows, cache, workdir, seconds or 5.0)),
                   ("bench-tiles", lambda: run_tiles_bench(budget, rows, cache, device))]
        for name, stage in stages:
            try:
                stage()
            except Exception as exc:  # noqa: BLE001 - one stage's crash must not lose the others' rows
                rows.append(Row(name, "-", "-", "ERROR", f"{type(exc).__name__}: {exc}"))
    rows.append(Row("info", "-", "elapsed", f"{time.monotonic() - started:.0f} s", f"budget {args.budget_s:.0f} s"))
    print(render_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.result in ("FAIL", "ERROR") for r in rows if r.stage in ("tests", "parity")) else 0


if __name__ == "__main__":
    sys.exit(main())
