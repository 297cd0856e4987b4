"""Pieces the report needs around the runs: model folders for the bench store, CPU placement,
the in-process predictor, and facts about the machine."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .servers import ROOT, write_model


@dataclass(frozen=True)
class Placement:
    """Which cores run what. `split`: serving front (and the load client) on one core, model worker on
    the other with one intra-op thread; `shared`: nothing pinned, the worker uses both cores."""

    name: str
    front_cpus: set[int] | None
    worker_cpus: set[int] | None
    threads: int

    def describe(self) -> str:
        if self.front_cpus is None:
            return f"`{self.name}`: nothing pinned; model worker with {self.threads} intra-op threads"
        return (f"`{self.name}`: serving front + load client on CPU {sorted(self.front_cpus)}, model worker on "
                f"CPU {sorted(self.worker_cpus)} with {self.threads} intra-op thread(s)")


def placement(name: str) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    if name == "split" and len(cpus) >= 2:
        half = len(cpus) // 2
        return Placement("split", set(cpus[:half]), set(cpus[half:]), len(cpus) - half)
    if name in ("split", "shared"):
        return Placement("shared", None, None, len(cpus))
    raise ValueError(f"unknown placement {name!r} (split, shared)")


def toml_dumps(data: dict, _prefix: str = "") -> str:
    """Enough TOML for model.toml: scalars, lists of scalars, tables and nested tables ([test_cfg.rpn])."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"[{_prefix[:-1]}]"] if _prefix else []
    lines += [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    text = "\n".join(lines) + "\n"
    return text + "".join("\n" + toml_dumps(v, f"{_prefix}{k}.") for k, v in data.items() if isinstance(v, dict))


def model_variant(src: Path, store: Path, name: str, **overrides) -> Path:
    """A copy of model folder `src` in `store` under `name`: model.toml with `overrides` (tables merged),
    every other file linked."""
    data = tomllib.loads((src / "model.toml").read_text())
    data["name"] = name
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    files = {p.name: p for p in src.iterdir() if p.is_file() and p.name != "model.toml"}
    return write_model(store, name, toml_dumps(data), files)


def load_predictor(model_dir: Path, threads: int):
    from ..pipeline.predictor import Predictor
    from ..settings import load_model_config

    return Predictor.from_config(load_model_config(model_dir), device="cpu", threads=threads)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_facts() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_gb, 1),
        "kernel": platform.release(), "os": _run(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
    }


def versions() -> dict:
    import grpc
    import numpy

    out = {"python": platform.python_version(), "numpy": numpy.__version__, "grpcio": grpc.__version__}
    for mod in ("torch", "onnxruntime", "uvicorn", "fastapi", "httpx"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    out["detserve"] = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "?"
    out["java"] = (subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines() or ["?"])[0] \
        if _which("java") else "absent"
    out["wrk"] = _run(["sh", "-c", "wrk -v 2>&1 | head -1"]) or "absent"
    out["h2load"] = _run(["sh", "-c", "h2load --version 2>&1 | head -1"]) or "absent"
    return out


def _which(name: str) -> bool:
    from shutil import which

    return which(name) is not None


def cpu_times() -> list[int]:
    """The machine's aggregate CPU counters from /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two `cpu_times()` readings.
    On a shared VM it is what makes one run's absolute figures lower than another's on the same
    machine type: the report states it so a reader can tell a slow run from a slow server."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])  # guest time (fields 9-10) is already counted in user
    return (after[7] - before[7]) / total if total > 0 else None


def wait_for_quiet(idle_share: float = 0.9, max_s: float = 60.0, sample_s: float = 1.0) -> float:
    """Wait until the machine's CPUs were at least `idle_share` idle over one sample (or `max_s` passed);
    returns the seconds waited. A section that starts while the last one's servers are still
    shutting down (TorchServe's JVM takes seconds) measures their teardown too. Stolen time counts as
    idle here: it is other guests' load, which waiting cannot end."""
    def times() -> tuple[int, int]:
        fields = cpu_times()
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0) + (fields[7] if len(fields) > 7 else 0)
        return sum(fields[:8]), idle  # total, idle + iowait + steal

    started = time.monotonic()
    try:
        while time.monotonic() - started < max_s:
            total0, idle0 = times()
            time.sleep(sample_s)
            total1, idle1 = times()
            if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= idle_share:
                break
    except OSError:  # no /proc: nothing to wait for
        pass
    return time.monotonic() - started


def busy_processes() -> list[str]:
    """Other CPU-heavy work running now (training, test suites): noted in the report."""
    out = _run(["ps", "-eo", "pid,stat,pcpu,args", "--sort=-pcpu"])
    busy = []
    for line in out.splitlines()[1:]:
        pid, stat, pcpu, args = (line.split(None, 3) + ["", "", ""])[:4]
        if stat.startswith("T"):
            continue  # stopped (SIGSTOP): ps's pcpu is a lifetime average, the process takes no CPU now
        try:
            if int(pid) != os.getpid() and float(pcpu) >= 20 and "service.commands.bench" not in args \
                    and "detserve bench" not in args and not args.startswith("ps "):
                busy.append(f"{pcpu}% {args[:100]}")
        except ValueError:
            continue
    return busy[:8]


def python_exe() -> str:
    return sys.executable
