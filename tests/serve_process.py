"""`detserve serve` as a real subprocess on free loopback ports, for the integration tests.

One copy of the start / wait-for-ready / stop dance, so each test module only says what differs:
its model store, server config, environment and whether gRPC listens.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.bench.servers import free_port, stop_process

TESTS = Path(__file__).resolve().parent
DETSERVE = str(Path(sys.executable).with_name("detserve"))
FAKE_FACTORY = "fakes:FakePredictor.from_config"


class ServeProcess:
    """Start with the constructor, then `wait_ready()`; `stop()` sends SIGTERM and returns the exit code.

    `fake=True` makes the workers run tests/fakes.py's scripted predictor; everything between the
    socket and the predictor is still the production code.
    """

    def __init__(self, store: Path, workdir: Path, *, models: list[str] | None = None, config: str = "",
                 fake: bool = True, grpc: bool = False, env: dict[str, str] | None = None, nice: int = 0):
        names = ["inference", "management", "metrics"] + (["grpc"] if grpc else [])
        self.ports = {name: free_port() for name in names}
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.mgmt = f"http://127.0.0.1:{self.ports['management']}"
        self.metrics = f"http://127.0.0.1:{self.ports['metrics']}"
        self.grpc_target = f"127.0.0.1:{self.ports['grpc']}" if grpc else None
        self.log_path = workdir / "server.log"
        # Keep the caller's PYTHONPATH after tests/: a worktree's `service` must win over the installed one.
        python_path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
        full_env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
        full_env.pop("DETSERVE_PREDICTOR_FACTORY", None)
        if fake:
            full_env["DETSERVE_PREDICTOR_FACTORY"] = FAKE_FACTORY
        full_env.update(env or {})
        cmd = [DETSERVE, "serve", "--model-store", str(store), "--host", "127.0.0.1",
               "--inference-port", str(self.ports["inference"]),
               "--management-port", str(self.ports["management"]), "--metrics-port", str(self.ports["metrics"])]
        cmd += ["--grpc-port", str(self.ports["grpc"])] if grpc else ["--no-grpc"]
        if models:
            cmd += ["--models", ",".join(models)]
        if config:
            config_path = workdir / "server.toml"
            config_path.write_text(config)
            cmd += ["--config", str(config_path)]
        if nice:
            cmd = ["nice", "-n", str(nice), *cmd]
        with open(self.log_path, "wb") as log:
            # Own session: a Ctrl+C on pytest must not reach the server's workers behind its back.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> int:
        return stop_process(self.proc, grace_s=30)
