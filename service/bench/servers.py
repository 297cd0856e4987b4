"""Start and stop the systems under test: `detserve serve` on a temporary model store, with free ports.

CPU placement is explicit so both systems get the same budget: `front_cpus` for the serving front
(and, by inheritance, anything it starts until `pin_workers` moves its children), `worker_cpus` for
model worker processes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# `detserve serve` without importing every other sub-command (a half-edited one must not stop a bench).
_SERVE_ONLY = (
    "import argparse, sys\n"
    "from service.commands import serve\n"
    "parser = argparse.ArgumentParser(prog='detserve')\n"
    "serve.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace_s: float = 20) -> int:
    """SIGTERM lets `detserve serve` drain; past `grace_s` its whole session (workers too) is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def children_of(pid: int) -> list[int]:
    """All descendants of pid (from /proc; no psutil in the serving venv)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def set_affinity(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of pid (sched_setaffinity on a pid affects one thread only)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


def write_model(store: Path, name: str, toml: str, files: dict[str, Path] | None = None) -> Path:
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(toml)
    for dest, src in (files or {}).items():
        target = folder / dest
        if not target.exists():
            try:
                os.symlink(src.resolve(), target)
            except OSError:
                shutil.copy(src, target)
    return folder


class DetserveServer:
    """`detserve serve` in a subprocess on 127.0.0.1 with free ports; a context manager."""

    def __init__(self, store: Path, models: list[str], *, front_cpus: set[int] | None = None,
                 worker_cpus: set[int] | None = None, log_path: Path | None = None, start_timeout_s: float = 180,
                 log_level: str | None = "warning"):
        """`log_level=None`: the server's default (info, one access-log line per request), as shipped."""
        self.store, self.models = store, models
        self.log_level = log_level
        self.front_cpus, self.worker_cpus = front_cpus, worker_cpus
        self.http_port, self.grpc_port = free_port(), free_port()
        self.mgmt_port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="detserve-bench-", suffix=".log")[1])
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> "DetserveServer":
        cmd = [sys.executable, "-c", _SERVE_ONLY, "serve", "--model-store", str(self.store),
               "--models", ",".join(self.models), "--host", "127.0.0.1",
               "--inference-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--management-port", str(self.mgmt_port), "--metrics-port", str(self.metrics_port)]
        if self.log_level is not None:
            cmd += ["--log-level", self.log_level]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        set_affinity(self.proc.pid, self.front_cpus)
        for model in self.models:
            wait_http(f"{self.url}/v2/models/{model}/ready", self.start_timeout_s, self.proc)
        self.pin_workers()
        return self

    def pin_workers(self) -> None:
        if self.proc is None:
            return
        set_affinity(self.proc.pid, self.front_cpus)
        for child in children_of(self.proc.pid):
            set_affinity(child, self.worker_cpus)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "DetserveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NoopServer:
    """service/bench/noop_app.py in a subprocess pinned to `cpus`; a context manager."""

    def __init__(self, cpus: set[int] | None = None):
        self.port, self.cpus = free_port(), cpus
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "NoopServer":
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "service.bench.noop_app", str(self.port)], cwd=ROOT,
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        set_affinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the no-op FastAPI server exited") from None
                time.sleep(0.2)
        raise TimeoutError("the no-op FastAPI server did not start")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
