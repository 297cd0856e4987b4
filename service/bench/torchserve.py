"""Start and stop TorchServe 0.12 (bench/torchserve/.venv, made by bench/torchserve/setup.sh) serving
the same detserve model folder through the handlers in service/bench/ts_handlers.py.

Settings: token auth off (--disable-token-auth), metrics_mode=prometheus and system metrics off (no
periodic metric collector process competing for the 2 cores), one worker per model, everything else
TorchServe's defaults. Models are registered through the management API exactly as the docs show:
the mmdet-style handler with the defaults (batch_size 1), the batched one with batch_size 8 and
max_batch_delay 50 ms (TorchServe's batch inference guide).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .servers import ROOT, children_of, free_port, set_affinity, wait_http

TS_DIR = ROOT / "bench" / "torchserve"
TS_VENV = TS_DIR / ".venv"
HANDLERS = TS_DIR / "handlers"


@dataclass(frozen=True)
class TsModel:
    name: str  # registered name
    handler: str  # file stem under bench/torchserve/handlers
    batch_size: int = 1
    max_batch_delay_ms: int = 100  # TorchServe's default; only matters with batch_size > 1


def ensure_venv() -> Path:
    """Run setup.sh (idempotent) and return the venv's bin folder."""
    if not (TS_VENV / ".installed-0.12.0").exists():
        subprocess.run(["bash", str(TS_DIR / "setup.sh")], check=True)
    return TS_VENV / "bin"


def torchserve_version() -> str:
    out = subprocess.run([str(TS_VENV / "bin" / "python"), "-c", "import ts.version as v; print(v.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


class TorchServe:
    """A TorchServe instance in a work folder, on 127.0.0.1 with free ports; a context manager."""

    def __init__(self, work: Path, model_dir: Path, models: list[TsModel], *, threads: int | None,
                 workers: int = 1, front_cpus: set[int] | None = None, worker_cpus: set[int] | None = None,
                 start_timeout_s: float = 180):
        """`threads=None`: TorchServe's own default (no OMP_NUM_THREADS, no torch.set_num_threads, so
        torch takes every core); `workers`: Python workers per model."""
        self.work, self.model_dir, self.models = work, model_dir, models
        self.threads = threads
        self.workers = workers
        self.front_cpus, self.worker_cpus = front_cpus, worker_cpus
        self.start_timeout_s = start_timeout_s
        self.http_port, self.mgmt_port, self.metrics_port = free_port(), free_port(), free_port()
        self.grpc_ports = (free_port(), free_port())
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _archive(self, bin_dir: Path, store: Path, model: TsModel) -> None:
        extra = self.work / "bench_config.json"
        extra.write_text(json.dumps({"model_dir": str(self.model_dir.resolve()), "threads": self.threads or 0}))
        subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", model.name, "--version", "1.0",
                        "--handler", str(HANDLERS / f"{model.handler}.py"), "--extra-files", str(extra),
                        "--export-path", str(store), "--force"], check=True, cwd=self.work)

    def start(self) -> "TorchServe":
        bin_dir = ensure_venv()
        if self.work.exists():
            shutil.rmtree(self.work)
        store = self.work / "model-store"
        store.mkdir(parents=True)
        for model in self.models:
            self._archive(bin_dir, store, model)
        config = self.work / "config.properties"
        config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.http_port}",
            f"management_address=http://127.0.0.1:{self.mgmt_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            f"grpc_inference_port={self.grpc_ports[0]}",
            f"grpc_management_port={self.grpc_ports[1]}",
            "metrics_mode=prometheus",
            "disable_system_metrics=true",
            "disable_token_authorization=true",
            "enable_model_api=true",
            f"default_workers_per_model={self.workers}",
        ]) + "\n")
        env = dict(os.environ, LOG_LOCATION=str(self.work / "logs"), METRICS_LOCATION=str(self.work / "logs"),
                   PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
        env.pop("OMP_NUM_THREADS", None)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self._log = open(self.work / "torchserve.out", "wb")
        self.proc = subprocess.Popen(
            [str(bin_dir / "torchserve"), "--start", "--foreground", "--ts-config", str(config),
             "--model-store", str(store), "--disable-token-auth", "--enable-model-api", "--ncs"],
            cwd=self.work, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        set_affinity(self.proc.pid, self.front_cpus)
        wait_http(f"{self.url}/ping", self.start_timeout_s, self.proc)
        for model in self.models:
            self.register(model)
        self.pin()
        return self

    def register(self, model: TsModel) -> None:
        query = urllib.parse.urlencode({
            "url": f"{model.name}.mar", "model_name": model.name, "initial_workers": self.workers,
            "batch_size": model.batch_size, "max_batch_delay": model.max_batch_delay_ms, "synchronous": "true",
        })
        request = urllib.request.Request(f"http://127.0.0.1:{self.mgmt_port}/models?{query}", method="POST")
        with urllib.request.urlopen(request, timeout=self.start_timeout_s) as response:
            response.read()

    def pin(self) -> None:
        """Frontend (Java) on front_cpus, Python model workers on worker_cpus."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *children_of(self.proc.pid)]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            set_affinity(pid, self.worker_cpus if b"model_service_worker" in cmdline else self.front_cpus)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Java may leave the Python workers behind; they are in our session, so reap the group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        self.proc = None

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready_model(url: str, model: str, timeout_s: float = 60) -> None:
    """A first prediction succeeds (the worker imported torch and loaded weights)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{url}/predictions/{model}", data=b"x", method="PUT",
                                             headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=30):
                return
        except urllib.error.HTTPError:
            return  # the worker answered (a bad body is fine for this probe)
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    raise TimeoutError(f"TorchServe model {model} did not answer within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Serve a model folder through TorchServe (no-op, mmdet-style, batched) until Ctrl-C:
    python -m service.bench.torchserve [--model-dir models/rtmdet] [--threads N]."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m service.bench.torchserve", description=main.__doc__)
    p.add_argument("--model-dir", default=str(ROOT / "models" / "rtmdet"))
    p.add_argument("--work", default=str(TS_DIR / "work"))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    models = [TsModel("noop", "noop"), TsModel("mmdet", "mmdet_style"), TsModel("batched", "batched", 8, 50)]
    with TorchServe(Path(args.work), Path(args.model_dir), models, threads=args.threads) as ts:
        print(f"TorchServe at {ts.url}: /predictions/{{noop,mmdet,batched}}; Ctrl-C stops it", flush=True)
        try:
            while ts.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
