"""`detserve bench`: load generator (`run`), in-process ceiling (`in-process`), and the full
side-by-side report (`report`, what `make bench` runs)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, help="measured requests per level (stops at whichever of this and --duration comes first)")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 10 unless --requests is given)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded load before each level (default 2)")
    p.add_argument("--images", help="folder of images (default: generated shape images at photo-like JPEG sizes)")
    p.add_argument("--num-images", type=int, default=16, help="corpus size (default 16)")
    p.add_argument("--json", dest="json_out", help="write the results as JSON to this file ('-' for stdout)")
    p.add_argument("--markdown", help="write the markdown table to this file (it is always printed)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar on stderr")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark a serving endpoint, the in-process ceiling, or write docs/benchmarks.md")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="MODE")

    run = sub.add_parser("run", help="load an HTTP or gRPC endpoint (closed-loop sweep or open-loop rate)")
    run.add_argument("--target", choices=("rest", "kserve-rest", "kserve-grpc", "grpc"), default="rest")
    run.add_argument("--url", default="http://127.0.0.1:8080",
                     help="http://host:port for REST targets, host:port for gRPC targets")
    run.add_argument("--model", default="rtmdet")
    run.add_argument("--concurrency", type=_levels, default=[16], help="closed-loop levels, e.g. 1,4,16,64")
    run.add_argument("--rate", type=float, help="open loop: requests per second (instead of --concurrency)")
    run.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    run.add_argument("--kserve-mode", choices=("raw", "binary", "json"), default="raw",
                     help="KServe REST body: raw JPEG (Inference-Header-Content-Length: 0), binary extension, or JSON base64")
    run.add_argument("--client", choices=("raw", "httpx"), default="raw",
                     help="HTTP client: raw asyncio HTTP/1.1 keep-alive (fast, default) or httpx")
    run.add_argument("--grpc-channels", type=int, default=1)
    _common(run)
    run.set_defaults(func=cmd_run)

    inp = sub.add_parser("in-process", help="the ceiling: Predictor directly, no serving layer")
    inp.add_argument("model", help="model name in --model-store, or a model folder")
    inp.add_argument("--model-store", default="models")
    inp.add_argument("--concurrency", type=_levels, default=[1, 16])
    inp.add_argument("--max-batch-size", type=int, help="default: the model's batch.max_batch_size")
    inp.add_argument("--threads", type=int, help="intra-op threads (default: the model's workers.threads, else all cores)")
    inp.add_argument("--cpus", help="pin to these CPUs, e.g. 1 or 0,1")
    _common(inp)
    inp.set_defaults(func=cmd_in_process)

    tiles = sub.add_parser("tiles", help="one tiled request (tiles batched) vs the same tiles sent one by one")
    tiles.add_argument("model", nargs="?", default="models/rtmdet", help="model folder (default models/rtmdet)")
    tiles.add_argument("--image", type=Path, help="image file (default: a generated 4000x3000 small-shapes image)")
    tiles.add_argument("--tile", type=int, help="tile side (default: the model's input size)")
    tiles.add_argument("--max-batch-size", type=int, default=8)
    tiles.add_argument("--rounds", type=int, default=3)
    tiles.add_argument("--device", help="cpu, cuda or cuda:N (default: the model's)")
    tiles.add_argument("--json", dest="json_out", help="also write the result as JSON here")
    tiles.set_defaults(func=cmd_tiles)

    rep = sub.add_parser("report", help="measure everything side by side and write docs/benchmarks.md")
    rep.add_argument("--out", default="docs/benchmarks.md")
    rep.add_argument("--json", dest="json_out", default="bench/results/latest.json")
    rep.add_argument("--model", default="models/rtmdet", help="model folder to benchmark (default models/rtmdet)")
    rep.add_argument("--quick", action="store_true", help="short runs, one round: for development (~3 min)")
    rep.add_argument("--duration", type=float)
    rep.add_argument("--rounds", type=int)
    rep.add_argument("--ts-warmup", type=float)
    rep.add_argument("--no-torchserve", action="store_true")
    rep.add_argument("--no-pinned", action="store_true", help="skip the extra pinned front/worker table")
    rep.add_argument("--no-wrk", action="store_true", help="load every door from the Python client, not wrk / h2load")
    rep.add_argument("--no-two-stage", action="store_true", help="skip the Mask R-CNN R-50 section (~4 min)")
    rep.add_argument("--from-json", help="re-render the markdown from a saved report JSON; measure nothing")
    rep.set_defaults(func=cmd_report)

    two = sub.add_parser("two-stage", help="Mask R-CNN R-50 served vs in-process at c4 (the report's section, alone)")
    two.add_argument("--rounds", type=int, default=6, help="alternating served/in-process rounds (default 6)")
    two.add_argument("--images-per-run", type=int, default=8, help="images per measured run (default 8)")
    two.add_argument("--concurrency", type=int, default=4)
    two.add_argument("--max-batch-size", type=int, default=4)
    two.add_argument("--scale", type=_levels, default=[512, 320], help="resize scale, long,short (default 512,320)")
    two.add_argument("--rpn-max-per-img", type=int, default=300)
    two.add_argument("--max-per-img", type=int, default=50)
    two.add_argument("--backend", choices=("auto", "eager", "onnxruntime"), default="onnxruntime")
    two.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the engine's rule)")
    two.add_argument("--json", dest="json_out", help="write the section's results as JSON to this file")
    two.set_defaults(func=cmd_two_stage)


def _corpus(args) -> list[bytes]:
    from ..bench.corpus import describe, load_corpus

    corpus = load_corpus(args.images, args.num_images)
    print(f"corpus: {describe(corpus)}", file=sys.stderr)
    return corpus


def _emit(results, args) -> None:
    from ..bench.stats import markdown_table

    table = markdown_table(results)
    print(table, end="")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json_out:
        text = json.dumps([r.to_json() for r in results], indent=1)
        if args.json_out == "-":
            print(text)
        else:
            Path(args.json_out).write_text(text + "\n")


def _duration(args) -> float | None:
    if args.duration is not None:
        return args.duration
    return None if args.requests is not None else 10.0


def cmd_run(args) -> int:
    import asyncio

    from ..bench.runner import LoadSpec, run_sweep
    from ..bench.targets import make_target

    corpus = _corpus(args)
    common = dict(requests=args.requests, duration_s=_duration(args), warmup_s=args.warmup,
                  timeout_s=args.timeout, progress=not args.no_progress)
    if args.rate is not None:
        specs = [LoadSpec(concurrency=None, rate=args.rate, **common)]
        pool = 64
    else:
        specs = [LoadSpec(concurrency=c, **common) for c in args.concurrency]
        pool = max(args.concurrency)
    target = make_target(args.target, args.url, args.model, corpus, kserve_mode=args.kserve_mode,
                         client=args.client, pool_size=pool, grpc_channels=args.grpc_channels)
    _emit(asyncio.run(run_sweep(target, specs)), args)
    return 0


def cmd_in_process(args) -> int:
    import os

    _worker_threads_env(args.threads)  # before the imports below bring torch in

    from ..bench.inprocess import run_in_process
    from ..pipeline.predictor import Predictor
    from ..settings import load_model_config

    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    folder = Path(args.model) if Path(args.model).is_dir() else Path(args.model_store) / args.model
    cfg = load_model_config(folder)
    threads = args.threads or cfg.workers.threads or len(os.sched_getaffinity(0))
    predictor = Predictor.from_config(cfg, threads=threads)
    corpus = _corpus(args)
    try:
        results = [
            run_in_process(predictor, corpus, concurrency=c, max_batch_size=args.max_batch_size or cfg.batch.max_batch_size,
                           requests=args.requests, duration_s=_duration(args), warmup_s=args.warmup,
                           label=f"in-process {cfg.name} c={c}", progress=not args.no_progress)
            for c in args.concurrency
        ]
    finally:
        predictor.close()
    _emit(results, args)
    return 0


def cmd_report(args) -> int:
    from ..bench.report import ReportOptions, run_report, write_report

    _worker_threads_env(None)  # the in-process baselines (rtmdet and Mask R-CNN) run as a worker does

    opts = ReportOptions(out=Path(args.out), json_out=Path(args.json_out) if args.json_out else None,
                         model_dir=Path(args.model), quick=args.quick, torchserve=not args.no_torchserve,
                         wrk=not args.no_wrk, pinned=not args.no_pinned, two_stage=not args.no_two_stage)
    if args.duration is not None:
        opts.duration_s = args.duration
    if args.rounds is not None:
        opts.rounds = args.rounds
    if args.ts_warmup is not None:
        opts.ts_warmup_s = args.ts_warmup
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        opts.json_out = None
        opts.quick = data["facts"]["options"].get("quick") == "True"
    else:
        data = run_report(opts)
    write_report(data, opts)
    print(f"wrote {opts.out}" + (f" and {opts.json_out}" if opts.json_out else ""), file=sys.stderr)
    return 0


def _worker_threads_env(threads: int | None) -> None:
    """The in-process side under a worker's OpenMP settings (engine/worker.py): idle OpenMP threads
    sleep instead of spinning against the backend's own pool. Measured: Mask R-CNN R-50 at 512x320 ran
    1.1-1.9x slower in-process than served with the default spinning pools. Only effective before torch
    is imported, which is why every bench command calls it first."""
    import os

    from ..engine.worker import set_thread_env

    if "torch" in sys.modules:
        print("detserve bench: torch is already imported; OpenMP settings unchanged", file=sys.stderr)
        return
    set_thread_env(threads or len(os.sched_getaffinity(0)))


def cmd_two_stage(args) -> int:
    import signal

    from ..bench.two_stage import TwoStageBench, measure_alone

    if len(args.scale) != 2:
        raise SystemExit("detserve bench two-stage: --scale takes two edges, e.g. 512,320")
    try:
        bench = TwoStageBench(resize_scale=(args.scale[0], args.scale[1]), concurrency=args.concurrency,
                              max_batch_size=args.max_batch_size, backend=args.backend, threads=args.threads,
                              rpn_max_per_img=args.rpn_max_per_img, max_per_img=args.max_per_img,
                              images_per_run=args.images_per_run, rounds=args.rounds)
    except ValueError as exc:
        raise SystemExit(f"detserve bench two-stage: {exc}") from None
    _worker_threads_env(args.threads)
    # SIGTERM unwinds like Ctrl-C, so the served detserve (its own session) is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data, markdown = measure_alone(bench)
    print(markdown)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    # `python -m service.commands.bench report ...`: the same as `detserve bench report ...`, without
    # importing the other sub-commands.
    _parser = argparse.ArgumentParser(prog="detserve")
    register(_parser.add_subparsers())
    _args = _parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(int(_args.func(_args) or 0))


def cmd_tiles(args) -> int:
    from ..bench.tiles import MARKDOWN_HEADER, bench_tiles

    result = bench_tiles(Path(args.model), args.image, tile=args.tile, max_batch_size=args.max_batch_size,
                         rounds=args.rounds, device=args.device)
    print(MARKDOWN_HEADER)
    print(result.markdown())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0
