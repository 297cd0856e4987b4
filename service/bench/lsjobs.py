"""Job throughput and interactive latency against a real Label Studio, side by side with /predictions.

`python -m service.bench.lsjobs --tasks 200` generates shape images, uploads them into a Label
Studio 1.23.2 project (service/bench/labelstudio.py; three more projects import the same uploaded
files as JSON tasks), starts `detserve serve` with the bundled `rtmdet` and measures, on the same
machine and the same images:

1. interactive p50 idle: one client sending `models/rtmdet/demo.jpg`, one request at a time,
   `--think-s` (0.5 s) between the answer and the next request (a person opening images), and
   closed-loop (no pause);
2. `/predictions` throughput on the files read from disk (`--clients` in parallel, each file once,
   and twice as many clients);
3. `/predictions` throughput with the fetch: each client first GETs the image from Label Studio
   (`/data/upload/...`, with the token), then sends it, as a job fetching through Label Studio must;
4. a job over the whole project, fetching its images from Label Studio (tasks/s from POST to done);
5. interactive p50 (with think time) during a second job, and that job's rate;
then a second server with `labelstudio.upload_root` set to Label Studio's upload folder:
6. `/predictions` from disk again, a job reading the uploads from that folder, and closed-loop
   interactive p50 during another job.

`--throughput-only --tasks 600` measures only the throughput, on a larger project, in alternating
rounds of `/predictions` and a job over a fresh project of the same images (`measure_throughput`).

(4) and (6) over the best `/predictions` figure of the run are issue 17's "job vs the engine's /predictions on the same images"; (4)/(3)
says how much of the gap is Label Studio serving the images. CPU seconds per process (Label
Studio, detserve's front, its worker) are recorded for (2), (3), (4) and (6). Everything shares
the machine's cores: Label Studio (its development server, SQLite), detserve and these clients.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .labelstudio import LabelStudio, LsClient, RunningLabelStudio
from .servers import ROOT, children_of, free_port, stop_process, wait_http

RECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="circle"/><Label value="square"/>
<Label value="triangle"/><Label value="star"/><Label value="hexagon"/></RectangleLabels></View>"""
DEMO = ROOT / "models" / "rtmdet" / "demo.jpg"


def shape_files(folder: Path, count: int, seed: int = 20261122) -> list[str]:
    from ..demo.dataset import make_dataset

    coco = json.loads(make_dataset(folder, count, seed=seed, min_side=240, max_side=800).read_text())
    return [str(folder / image["file_name"]) for image in coco["images"]]


class Detserve:
    """`detserve serve` with the bundled models, Label Studio's URL and key, a job store; kill-able."""

    def __init__(self, work: Path, ls: RunningLabelStudio, *, store: Path | None = None,
                 models: tuple[str, ...] = ("rtmdet",), config: str = "", basic_auth: tuple[str, str] | None = None,
                 env: dict[str, str] | None = None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.ports = {k: free_port() for k in ("inference", "management", "metrics")}
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        config_path = work / "server.toml"
        # A shared, busy CPU must not look like a hung worker.
        config_path.write_text("heartbeat_timeout_s = 120.0\n" + config)
        self.cmd = [str(Path(sys.executable).with_name("detserve")), "serve", "--config", str(config_path),
                    "--model-store", str(store or ROOT / "models"), "--models", ",".join(models),
                    "--host", "127.0.0.1", "--no-grpc", "--log-level", "warning",
                    "--inference-port", str(self.ports["inference"]),
                    "--management-port", str(self.ports["management"]), "--metrics-port", str(self.ports["metrics"])]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.pat,
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                    "DETSERVE_LABELSTUDIO__JOBS__STORE_PATH": str(work / "jobs.sqlite3")}
        if basic_auth:
            self.env.update(BASIC_AUTH_USER=basic_auth[0], BASIC_AUTH_PASS=basic_auth[1])
        self.env.update(env or {})
        self.log = work / "detserve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> "Detserve":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        wait_http(f"{self.url}/readyz", timeout_s, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL to the whole session (front and workers): no draining, no shutdown hooks."""
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace_s=30)

    def __enter__(self) -> "Detserve":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def interactive(url: str, *, count: int | None = None, until: threading.Event | None = None,
                think_s: float = 0.0, model: str = "rtmdet") -> list[float]:
    """Seconds per /predictions call of demo.jpg, one at a time with `think_s` between calls (a
    person opening one image after another), `count` calls or until `until` is set."""
    body = DEMO.read_bytes()
    out = []
    with httpx.Client(timeout=120, trust_env=False) as http:
        http.put(f"{url}/predictions/{model}", content=body).raise_for_status()  # warm the connection
        while (count is None or len(out) < count) and not (until is not None and until.is_set()):
            started = time.perf_counter()
            http.put(f"{url}/predictions/{model}", content=body).raise_for_status()
            out.append(time.perf_counter() - started)
            time.sleep(think_s)
    return out


def predictions_rate(url: str, images: list, clients: int, *, model: str = "rtmdet",
                     fetch: LsClient | None = None) -> dict:
    """Images per second through /predictions, `clients` at a time, each image once. `images` are
    paths on disk, or, with `fetch`, Label Studio paths fetched before each call."""
    local = threading.local()

    def one(ref) -> int:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120, trust_env=False)
        body = fetch.http.get(ref).content if fetch else Path(ref).read_bytes()
        return local.http.put(f"{url}/predictions/{model}", content=body).status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        codes = list(pool.map(one, images))
    elapsed = time.perf_counter() - started
    ok = sum(c == 200 for c in codes)
    return {"images": len(images), "ok": ok, "refused": len(images) - ok, "seconds": round(elapsed, 2),
            "per_s": round(ok / elapsed, 3)}


def run_job(url: str, project: int, *, model: str = "rtmdet", auth=None, poll_s: float = 0.25,
            timeout_s: float = 3600) -> dict:
    """POST a job over the whole project and poll it until it ends; its view plus the wall time."""
    base = f"{url}/labelstudio/{model}/jobs"
    with httpx.Client(timeout=60, trust_env=False, auth=auth) as http:
        started = time.perf_counter()
        resp = http.post(base, json={"project": project})
        resp.raise_for_status()
        view = resp.json()
        deadline = time.monotonic() + timeout_s
        while view["state"] not in ("done", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {view['id']} not done in {timeout_s} s: {view}")
            time.sleep(poll_s)
            view = http.get(f"{base}/{view['id']}").json()
        elapsed = time.perf_counter() - started
    finished = view["done"] + view["skipped"] + view["failed"]
    return {**{k: view[k] for k in ("state", "done", "skipped", "failed")},
            "seconds": round(elapsed, 2), "per_s": round(finished / elapsed, 3)}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class CpuMeter:
    """CPU seconds (user + system, all threads) used by groups of processes while a block runs."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        return {name: sum(_cpu_s(p) for p in pids) for name, pids in self.groups.items()}

    def __enter__(self) -> "CpuMeter":
        self._start, self._wall = self._sample(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        self.used = {name: round(end[name] - self._start[name], 1) for name in end}
        self.used["wall"] = round(time.perf_counter() - self._wall, 1)


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CpuMeter.TICK  # utime, stime


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _cpu_groups(ls: RunningLabelStudio, ds: Detserve) -> dict[str, list[int]]:
    """Label Studio (its process tree), detserve's front process, its model workers: forked ones share
    the forkserver's command line (the forkserver, idle but for forks, counts with them), spawned ones
    run spawn_main."""
    below = children_of(ds.proc.pid)
    workers = [p for p, line in ((p, _cmdline(p)) for p in below)
               if b"multiprocessing.forkserver" in line or b"spawn_main" in line]
    return {"label_studio": [ls.pid, *children_of(ls.pid)], "detserve_front": [ds.proc.pid],
            "detserve_workers": workers}


def measure(work: Path, tasks: int, clients: int, think_s: float = 0.5) -> dict:
    """The figures of the module docstring (a dict: rates per second, p50 in ms, CPU seconds)."""
    files = shape_files(work / "shapes", tasks)
    out: dict = {"tasks": tasks, "clients": clients, "cores": os.cpu_count(), "think_s": think_s,
                 "load_before": load_average()}
    with LabelStudio(work / "label-studio") as running:
        ls = LsClient(running.url)
        projects = [ls.create_project(f"bench job {i}", RECT_CONFIG) for i in range(4)]
        ls.upload(projects[0], files)
        uploads = [t["data"]["image"] for t in ls.tasks(projects[0])]
        for project in projects[1:]:  # the same uploaded files, no second upload
            ls.import_tasks(project, [{"image": u} for u in uploads])
        with Detserve(work / "http", running) as ds:
            groups = _cpu_groups(running, ds)
            out["idle_p50_ms"] = p50_ms(interactive(ds.url, count=20, think_s=think_s))
            out["idle_closed_loop_p50_ms"] = p50_ms(interactive(ds.url, count=40))
            with CpuMeter(groups) as cpu:
                out["predictions_disk"] = predictions_rate(ds.url, files, clients)
            out["predictions_disk"]["cpu_s"] = cpu.used
            out["predictions_disk_2x_clients"] = predictions_rate(ds.url, files, 2 * clients)
            with CpuMeter(groups) as cpu:
                out["predictions_fetched"] = predictions_rate(ds.url, uploads, clients, fetch=ls)
            out["predictions_fetched"]["cpu_s"] = cpu.used
            out["load_before_job"] = load_average()
            with CpuMeter(groups) as cpu:
                out["job_fetching"] = run_job(ds.url, projects[0])
            out["job_fetching"]["cpu_s"] = cpu.used
            out["busy_p50_ms"], out["job_during_interactive"] = _job_with_interactive(ds.url, projects[1], think_s)
        upload_root = work / "label-studio" / "media" / "upload"
        with Detserve(work / "shared", running, env={"DETSERVE_LABELSTUDIO__UPLOAD_ROOT": str(upload_root)}) as ds:
            groups = _cpu_groups(running, ds)
            out["predictions_disk_again"] = predictions_rate(ds.url, files, clients)
            with CpuMeter(groups) as cpu:
                out["job_upload_root"] = run_job(ds.url, projects[2])
            out["job_upload_root"]["cpu_s"] = cpu.used
            out["busy_closed_loop_p50_ms"], out["job_during_closed_loop"] = _job_with_interactive(ds.url, projects[3], 0.0)
        ls.close()
    out["load_after"] = load_average()
    # The engine's best /predictions figure of the run is the yardstick.
    disk = max(out[k]["per_s"] for k in ("predictions_disk", "predictions_disk_2x_clients", "predictions_disk_again"))
    out["predictions_disk_best"] = disk
    out["job_fetching_vs_disk"] = round(out["job_fetching"]["per_s"] / disk, 3)
    out["job_fetching_vs_fetched"] = round(out["job_fetching"]["per_s"] / out["predictions_fetched"]["per_s"], 3)
    out["job_upload_root_vs_disk"] = round(out["job_upload_root"]["per_s"] / disk, 3)
    out["busy_vs_idle"] = round(out["busy_p50_ms"] / out["idle_p50_ms"], 3)
    out["busy_closed_loop_vs_idle"] = round(out["busy_closed_loop_p50_ms"] / out["idle_closed_loop_p50_ms"], 3)
    return out


def measure_throughput(work: Path, tasks: int, clients: int, rounds: int = 2) -> dict:
    """`--throughput-only`: issue 17's throughput figure on a larger project, where a job's fixed
    costs (listing the project, the first read, the last import: about 2 s a job, measured) weigh
    what they weigh at project scale. Each round runs `/predictions` on the files from disk and then
    a job over a fresh project of the same uploaded images, back to back on the same server (the
    order flips every round), for both ways a job gets its images: through Label Studio (compared
    with `/predictions` whose client fetches each image from Label Studio first, which pays the
    same Label Studio CPU) and from `labelstudio.upload_root` (compared with `/predictions` from disk)."""
    files = shape_files(work / "shapes", tasks)
    out: dict = {"tasks": tasks, "clients": clients, "cores": os.cpu_count(), "rounds": [],
                 "load_before": load_average()}
    with LabelStudio(work / "label-studio") as running:
        ls = LsClient(running.url)
        first = ls.create_project("bench upload", RECT_CONFIG)
        ls.upload(first, files)
        uploads = [t["data"]["image"] for t in ls.tasks(first)]

        def fresh_project(name: str) -> int:
            project = ls.create_project(name, RECT_CONFIG)
            ls.import_tasks(project, [{"image": u} for u in uploads])
            return project

        upload_root = work / "label-studio" / "media" / "upload"
        for mode, env in (("fetching", {}), ("upload_root", {"DETSERVE_LABELSTUDIO__UPLOAD_ROOT": str(upload_root)})):
            projects = [fresh_project(f"bench {mode} {r}") for r in range(rounds)]
            with Detserve(work / mode, running, env=env) as ds:
                predictions_rate(ds.url, files[: 4 * clients], clients)  # warm-up
                for r, project in enumerate(projects):
                    row: dict = {"mode": mode, "round": r + 1}

                    def engine_side() -> None:
                        fetch = ls if mode == "fetching" else None
                        row["predictions"] = predictions_rate(ds.url, uploads if fetch else files, clients, fetch=fetch)

                    def job_side() -> None:
                        row["job"] = run_job(ds.url, project)

                    for side in ((engine_side, job_side) if r % 2 == 0 else (job_side, engine_side)):
                        side()
                    row["ratio"] = round(row["job"]["per_s"] / row["predictions"]["per_s"], 3)
                    out["rounds"].append(row)
                    print(f"{mode} round {r + 1}: job {row['job']['per_s']:.2f}/s, /predictions "
                          f"{row['predictions']['per_s']:.2f}/s, ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)
        ls.close()
    out["load_after"] = load_average()
    for mode in ("fetching", "upload_root"):
        ratios = [row["ratio"] for row in out["rounds"] if row["mode"] == mode]
        out[f"{mode}_ratio_median"] = statistics.median(ratios)
    return out


def _job_with_interactive(url: str, project: int, think_s: float) -> tuple[float, dict]:
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        during = pool.submit(interactive, url, until=stop, think_s=think_s)
        time.sleep(1.0)  # the interactive client is warm before the job starts
        try:
            job = run_job(url, project)
        finally:
            stop.set()
        samples = during.result()
    return p50_ms(samples), {**job, "interactive_calls": len(samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.lsjobs", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--think-s", type=float, default=0.5, help="pause between interactive requests")
    p.add_argument("--work", help="work folder (default: a temporary one, removed after)")
    p.add_argument("--out", help="write the figures as JSON here too")
    p.add_argument("--throughput-only", action="store_true",
                   help="only job vs /predictions throughput, alternating rounds (use with --tasks 600 or more)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per image source with --throughput-only")
    args = p.parse_args(argv)

    def run(work: Path) -> dict:
        if args.throughput_only:
            return measure_throughput(work, args.tasks, args.clients, args.rounds)
        return measure(work, args.tasks, args.clients, args.think_s)

    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = run(Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="detserve-lsjobs-") as tmp:
            result = run(Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
