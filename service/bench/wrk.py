"""Load from wrk (C, Debian package `wrk`): the same bodies at the same concurrency as the Python
client, without its CPU cost on the cores the server shares. REST doors only (wrk speaks HTTP/1.1);
gRPC doors get h2load (bench/h2load.py)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from .stats import RunResult

LUA = """
wrk.method = "%(method)s"
%(headers)s
local paths = {%(paths)s}
local requests = {}
init = function(args)
  for i, p in ipairs(paths) do
    local f = assert(io.open(p, "rb"))
    requests[i] = wrk.format("%(method)s", "%(path)s", nil, f:read("*all"))
    f:close()
  end
end
local n = 0
request = function()
  n = n %% #requests + 1
  return requests[n]
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_output(text: str, label: str, concurrency: int, duration_s: float) -> RunResult:
    """Requests/sec, the --latency percentiles, and non-2xx/socket errors from wrk's report."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    pct = {int(m.group(1)): _ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)\s*$", text, re.M)}
    max_match = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text)
    errors: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors["non-2xx"] = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups()):
            if int(value):
                errors[f"socket-{name}"] = int(value)
    ok = total - sum(errors.values())
    return RunResult(
        label=label, target="wrk", concurrency=concurrency, rate=None, requests=total, ok=ok, errors=errors,
        duration_s=duration_s, throughput=rps * ok / total if total else 0.0,
        p50_ms=pct.get(50, float("nan")), p90_ms=pct.get(90, float("nan")), p99_ms=pct.get(99, float("nan")),
        max_ms=_ms(max_match.group(1)) if max_match else float("nan"), mean_ms=float("nan"),
    )


# What each REST door is sent: the image as the whole body, as the Python client's "raw" mode sends it.
DOORS = {
    "rest": ("PUT", "/predictions/{model}", {"Content-Type": "application/octet-stream"}),
    "kserve-rest": ("POST", "/v2/models/{model}/infer",
                    {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "0"}),
}


def request_line(kind: str, model: str) -> str:
    method, path, headers = DOORS[kind]
    return f"{method} {path.format(model=model)}" + "".join(f" ({k}: {v})" for k, v in headers.items()
                                                          if k != "Content-Type")


def run_wrk(url: str, model: str, corpus: list[bytes], *, concurrency: int, duration_s: float, threads: int = 1,
            label: str = "wrk", cpus: set[int] | None = None, timeout_s: float = 60, kind: str = "rest") -> RunResult:
    method, path, headers = DOORS[kind]
    path = path.format(model=model)
    with tempfile.TemporaryDirectory(prefix="detserve-wrk-") as tmp:
        files = []
        for i, body in enumerate(corpus):
            f = Path(tmp) / f"{i}.bin"
            f.write_bytes(body)
            files.append(f'"{f}"')
        script = Path(tmp) / "put.lua"
        script.write_text(LUA % {"paths": ", ".join(files), "path": path, "method": method,
                                 "headers": "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())})
        parts = urlsplit(url)
        cmd = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration_s:g}s", "--latency",
               "--timeout", f"{timeout_s:g}s", "-s", str(script), f"{parts.scheme}://{parts.netloc}"]
        if cpus:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()[:500]}")
    return parse_output(out.stdout, label, concurrency, duration_s)
