"""Latency statistics and the result record of one load run, with its JSON and markdown forms."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass
class RunResult:
    """One measured load level. Latencies in milliseconds, throughput in successful requests/s."""

    label: str
    target: str
    concurrency: int | None
    rate: float | None
    requests: int  # completed in the measured window (ok + errors)
    ok: int
    errors: dict[str, int]  # by code: HTTP status, gRPC status name, or exception class
    duration_s: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    images_per_request: int = 1
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.throughput * self.images_per_request

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None  # JSON has no NaN
        return data


def summarize(
    label: str,
    target: str,
    latencies_s: Iterable[float],
    codes: Iterable[str],
    duration_s: float,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    images_per_request: int = 1,
    notes: str = "",
) -> RunResult:
    """Latencies of successful requests (seconds) and the code of every completed request ("ok" or an error)."""
    lat_ms = sorted(x * 1000.0 for x in latencies_s)
    counts = Counter(codes)
    ok = counts.pop("ok", 0)
    total = ok + sum(counts.values())
    return RunResult(
        label=label,
        target=target,
        concurrency=concurrency,
        rate=rate,
        requests=total,
        ok=ok,
        errors=dict(sorted(counts.items())),
        duration_s=duration_s,
        throughput=ok / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(lat_ms, 50),
        p90_ms=percentile(lat_ms, 90),
        p99_ms=percentile(lat_ms, 99),
        max_ms=lat_ms[-1] if lat_ms else math.nan,
        mean_ms=sum(lat_ms) / len(lat_ms) if lat_ms else math.nan,
        images_per_request=images_per_request,
        notes=notes,
    )


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(results: Sequence[RunResult]) -> str:
    """One row per run; errors as `code:count` pairs."""
    head = "| run | target | conc. | rate | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    rows = [head, rule]
    for r in results:
        errors = ", ".join(f"{code}:{n}" for code, n in r.errors.items()) or "0"
        rows.append(
            "| " + " | ".join([
                _cell(r.label), _cell(r.target),
                str(r.concurrency) if r.concurrency is not None else "-",
                _fmt(r.rate) if r.rate is not None else "-",
                str(r.requests), _fmt(r.throughput), _fmt(r.p50_ms, 2), _fmt(r.p90_ms, 2),
                _fmt(r.p99_ms, 2), _fmt(r.max_ms, 2), _cell(errors),
            ]) + " |"
        )
    return "\n".join(rows) + "\n"
