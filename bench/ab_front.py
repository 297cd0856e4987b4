"""A/B of the serving front with the null model against the bare FastAPI no-op, in one run.

The same servers and load as `make bench`'s "Serving overhead" table (service/bench/servers.py,
wrk -t1 -c16 PUT of the bench corpus, detserve at its shipped log level), but short and with
alternating rounds, so a change to the front can be measured in a few minutes:

    flock /tmp/bench.lock python bench/ab_front.py                 # this tree vs bare FastAPI
    flock /tmp/bench.lock python bench/ab_front.py --tree /work/main --tree .   # before / after
    python bench/ab_front.py --profile 8                           # py-spy of the front instead

Each --tree is served from that checkout (its own `service` package); the no-op always from this one.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from service.bench import servers  # noqa: E402
from service.bench.corpus import generated_corpus  # noqa: E402
from service.bench.wrk import run_wrk  # noqa: E402

NULL_TOML = 'name = "null"\narch = "null"\n[batch]\nmax_batch_size = 8\nmax_batch_delay_ms = 0.0\n'


def start_detserve(tree: Path, store: Path) -> servers.DetserveServer:
    servers.ROOT = tree  # DetserveServer runs `detserve serve` with cwd and PYTHONPATH = ROOT
    try:
        return servers.DetserveServer(store, ["null"], log_level=None).start()
    finally:
        servers.ROOT = HERE


def profile(server: servers.DetserveServer, corpus, seconds: float, out: Path, worker: bool = False) -> None:
    pid = servers.children_of(server.proc.pid)[-1] if worker else server.proc.pid
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "200",
                            "--format", "raw", "-o", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run_wrk(server.url, "null", corpus, concurrency=16, duration_s=seconds)
    spy.wait(60)
    print(f"py-spy collapsed stacks: {out}")
    totals: dict[str, int] = {}
    self_time: dict[str, int] = {}
    grand = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        grand += n
        frames = stack.split(";")
        for frame in set(frames):
            totals[frame] = totals.get(frame, 0) + n
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
    print(f"{grand} samples; top self time:")
    for frame, n in sorted(self_time.items(), key=lambda kv: -kv[1])[:35]:
        print(f"  {100 * n / grand:5.1f}%  {frame}")
    print("top inclusive time:")
    for frame, n in sorted(totals.items(), key=lambda kv: -kv[1])[:45]:
        print(f"  {100 * n / grand:5.1f}%  {frame}")


def mean_batch(server: servers.DetserveServer) -> float:
    """Images per batch so far, from the server's own Prometheus histogram."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("detserve_batch_size_sum", "detserve_batch_size_count")):
            name, value = line.split(" ")
            values[name.split("{")[0]] = float(value)
    return values.get("detserve_batch_size_sum", 0.0) / max(1.0, values.get("detserve_batch_size_count", 0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout to serve detserve from (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy the first tree's front for this long")
    parser.add_argument("--worker", action="store_true", help="with --profile: py-spy the worker, not the front")
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [HERE])]
    corpus = generated_corpus(16, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="detserve-ab-"))
    servers.write_model(tmp / "store", "null", NULL_TOML)
    started = [start_detserve(tree, tmp / "store") for tree in trees]
    try:
        if args.profile:
            profile(started[0], corpus, args.profile, tmp / "front.txt", worker=args.worker)
            return 0
        with servers.NoopServer() as noop:
            targets = [("bare FastAPI no-op", noop.url)] + [(f"null {t}", s.url) for t, s in zip(trees, started)]
            for _, url in targets:
                run_wrk(url, "null", corpus, concurrency=args.concurrency, duration_s=args.warmup)
            results: dict[str, list] = {label: [] for label, _ in targets}
            for r in range(args.rounds):
                order = targets if r % 2 == 0 else targets[::-1]
                for label, url in order:
                    res = run_wrk(url, "null", corpus, concurrency=args.concurrency, duration_s=args.duration)
                    results[label].append(res)
                    print(f"round {r + 1} {label:60s} {res.throughput:8.1f} req/s  p50 {res.p50_ms:6.2f}  "
                          f"p99 {res.p99_ms:6.2f} ms  errors {res.errors or '-'}", flush=True)
        bare = statistics.mean(r.throughput for r in results[targets[0][0]])
        print(f"\n{'':60s} {'req/s':>8s} {'x bare':>7s} {'p50':>7s} {'p99':>7s}")
        for label, runs in results.items():
            rps = statistics.mean(r.throughput for r in runs)
            p50 = statistics.mean(r.p50_ms for r in runs)
            p99 = statistics.mean(r.p99_ms for r in runs)
            print(f"{label:60s} {rps:8.1f} {rps / bare:7.2f} {p50:7.2f} {p99:7.2f}")
        for tree, server in zip(trees, started):
            print(f"mean batch size, null {tree}: {mean_batch(server):.2f}")
    finally:
        for server in started:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
