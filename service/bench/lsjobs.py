"""Job throughput and interactive latency against a real Label Studio, side by side with /predictions.

`python -m service.bench.lsjobs --tasks 200` generates shape images, uploads them into a fresh
Label Studio 1.23.2 project (service/bench/labelstudio.py), starts `detserve serve` with the
bundled `rtmdet` and measures, in this order, on the same machine and the same images:

1. interactive p50 idle: one client, `models/rtmdet/demo.jpg`, one request at a time;
2. `/predictions` throughput on the files read from disk (`--clients` in parallel, each file once);
3. `/predictions` throughput with the fetch: each client first GETs the image from Label Studio
   (`/data/upload/...`, with the token), then sends it, as a job must;
4. job throughput: one job over the whole project (tasks/s from POST to "done");
5. interactive p50 during a second job (another project over the same uploaded images), and that
   job's own rate.

So (4)/(2) is what issue 17 asks for (the job against the engine fed from disk), and (4)/(3) says
how much of the gap is Label Studio serving the images. Everything shares the machine's cores:
Label Studio (its development server, SQLite), detserve's front and worker, and these clients.
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
from .servers import ROOT, free_port, stop_process, wait_http

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
                 models: tuple[str, ...] = ("rtmdet",), config: str = "", basic_auth: tuple[str, str] | None = None):
        self.work = work
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
                model: str = "rtmdet") -> list[float]:
    """Seconds per /predictions call of demo.jpg, one at a time: `count` calls, or until `until`."""
    body = DEMO.read_bytes()
    out = []
    with httpx.Client(timeout=120, trust_env=False) as http:
        http.put(f"{url}/predictions/{model}", content=body).raise_for_status()  # warm the connection
        while (count is None or len(out) < count) and not (until is not None and until.is_set()):
            started = time.perf_counter()
            http.put(f"{url}/predictions/{model}", content=body).raise_for_status()
            out.append(time.perf_counter() - started)
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
    return {**view, "seconds": round(elapsed, 2), "per_s": round(finished / elapsed, 3)}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(work: Path, tasks: int, clients: int, idle_calls: int = 40) -> dict:
    files = shape_files(work / "shapes", tasks)
    out: dict = {"tasks": tasks, "clients": clients, "cores": os.cpu_count(), "load_before": load_average()}
    with LabelStudio(work / "label-studio") as ls, Detserve(work, ls) as ds:
        client = ls.client()
        project = client.create_project("bench job", RECT_CONFIG)
        client.upload(project, files)
        uploads = [t["data"]["image"] for t in client.tasks(project)]
        out["idle_p50_ms"] = p50_ms(interactive(ds.url, count=idle_calls))
        out["predictions_disk"] = predictions_rate(ds.url, files, clients)
        out["predictions_fetched"] = predictions_rate(ds.url, uploads, clients, fetch=client)
        out["load_before_job"] = load_average()
        out["job"] = {k: v for k, v in run_job(ds.url, project).items() if k != "failures"}
        second = client.create_project("bench job, interactive", RECT_CONFIG)
        client.import_tasks(second, [{"image": u} for u in uploads])
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            during = pool.submit(interactive, ds.url, until=stop)
            time.sleep(1.0)  # the interactive client is warm before the job starts
            job2 = run_job(ds.url, second)
            stop.set()
            samples = during.result()
        out["job_during_interactive"] = {k: v for k, v in job2.items() if k != "failures"}
        out["busy_p50_ms"] = p50_ms(samples)
        out["busy_calls"] = len(samples)
        out["load_after"] = load_average()
        client.close()
    out["job_vs_disk"] = round(out["job"]["per_s"] / out["predictions_disk"]["per_s"], 3)
    out["job_vs_fetched"] = round(out["job"]["per_s"] / out["predictions_fetched"]["per_s"], 3)
    out["busy_vs_idle"] = round(out["busy_p50_ms"] / out["idle_p50_ms"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench.lsjobs", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--work", help="work folder (default: a temporary one, removed after)")
    p.add_argument("--out", help="write the figures as JSON here too")
    args = p.parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = measure(Path(args.work), args.tasks, args.clients)
    else:
        with tempfile.TemporaryDirectory(prefix="detserve-lsjobs-") as tmp:
            result = measure(Path(tmp), args.tasks, args.clients)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
