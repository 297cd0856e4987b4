"""Load for the gRPC doors from h2load (C, Debian package `nghttp2-client`), as wrk is for REST.

The Python gRPC client costs about as much CPU per call as the server's door, on the same 2 cores:
with it, a gRPC row measured the client as much as the server. h2load sends one pre-framed message
(gRPC's 5-byte prefix + the serialised request) on every stream of one HTTP/2 connection per channel.
It cannot read gRPC's status, which travels in trailers after an HTTP 200, so errors are counted on
the server's side: the `detserve_requests_total` codes other than OK (and CANCELLED, the streams
h2load abandons when its time is up) that the run added, warm-up included, are taken off the
successful count.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..observability.metrics import UNKNOWN_MODEL
from .stats import RunResult, percentile
from .targets import make_target

_NOT_ERRORS = ("OK", "CANCELLED")
# The door's protocol label in detserve_requests_total, by bench target kind.
_PROTOCOL = {"grpc": "grpc", "kserve-grpc": "kserve_grpc"}


def available() -> bool:
    return shutil.which("h2load") is not None


def median_image(corpus: list[bytes]) -> bytes:
    return sorted(corpus, key=len)[len(corpus) // 2]


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def server_codes(metrics_url: str, model: str, protocol: str) -> dict[str, float]:
    """detserve_requests_total for one model and door, by code; with the not-found requests, which
    the server counts under one label whatever model they named."""
    text = httpx.get(f"{metrics_url}/metrics", timeout=10).text
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "detserve_requests":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (sample.name.endswith("_total") and labels.get("model") in (model, UNKNOWN_MODEL)
                    and labels.get("protocol") == protocol):
                codes[labels["code"]] = codes.get(labels["code"], 0.0) + sample.value
    return codes


def parse_log(text: str) -> tuple[list[float], dict[str, int]]:
    """h2load's --log-file (start in us, HTTP status, us to the end of the response): latencies in
    ms of the HTTP 200 streams, and the other statuses counted."""
    latencies, errors = [], {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if parts[1] == "200":
            latencies.append(int(parts[2]) / 1000.0)
        else:
            errors[f"http-{parts[1]}"] = errors.get(f"http-{parts[1]}", 0) + 1
    return latencies, errors


def result(label: str, concurrency: int, duration_s: float, latencies_ms: list[float], errors: dict[str, int]) -> RunResult:
    ordered = sorted(latencies_ms)
    # HTTP errors are streams beside the 200s; gRPC errors (counted by the server) are among them.
    http_errors = sum(v for k, v in errors.items() if k.startswith("http-"))
    ok = max(0, len(ordered) - (sum(errors.values()) - http_errors))
    return RunResult(
        label=label, target="h2load", concurrency=concurrency, rate=None, requests=len(ordered) + http_errors,
        ok=ok, errors=errors,
        duration_s=duration_s, throughput=ok / duration_s if duration_s else 0.0,
        p50_ms=percentile(ordered, 50), p90_ms=percentile(ordered, 90), p99_ms=percentile(ordered, 99),
        max_ms=ordered[-1] if ordered else float("nan"),
        mean_ms=sum(ordered) / len(ordered) if ordered else float("nan"),
    )


def command(address: str, method: str, body_file: Path, log_file: Path, *, concurrency: int, duration_s: float,
            warmup_s: float, channels: int = 1) -> list[str]:
    streams = max(1, -(-concurrency // channels))
    cmd = ["h2load", "-D", f"{duration_s:g}", "-c", str(channels), "-m", str(streams),
           "-H", "content-type: application/grpc", "-H", "te: trailers",
           "-d", str(body_file), f"--log-file={log_file}"]
    if warmup_s > 0:
        cmd.append(f"--warm-up-time={warmup_s:g}")
    return [*cmd, f"http://{address}{method}"]


def run_h2load(address: str, kind: str, model: str, corpus: list[bytes], *, concurrency: int, duration_s: float,
               warmup_s: float, metrics_url: str | None, label: str = "h2load", channels: int = 1,
               cpus: set[int] | None = None) -> tuple[RunResult, str]:
    """One timed run; returns the result and the command line (for the report)."""
    target = make_target(kind, address, model, [median_image(corpus)])
    protocol = _PROTOCOL[kind]
    before = server_codes(metrics_url, model, protocol) if metrics_url else {}
    with tempfile.TemporaryDirectory(prefix="detserve-h2load-") as tmp:
        body, log = Path(tmp) / "request.bin", Path(tmp) / "log.tsv"
        body.write_bytes(grpc_frame(target.payloads[0]))
        cmd = command(address, target.method, body, log, concurrency=concurrency, duration_s=duration_s,
                      warmup_s=warmup_s, channels=channels)
        if cpus:
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + warmup_s + 120)
        if out.returncode != 0 or not log.exists():
            raise RuntimeError(f"h2load failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
        latencies, errors = parse_log(log.read_text())
    if metrics_url:
        after = server_codes(metrics_url, model, protocol)
        for code, value in after.items():
            added = int(value - before.get(code, 0.0))
            if code not in _NOT_ERRORS and added > 0:
                errors[code] = added
    shown = " ".join(part if " " not in part else repr(part) for part in cmd)
    return result(label, concurrency, duration_s, latencies, errors), re.sub(r"/tmp/\S+/", "", shown)
