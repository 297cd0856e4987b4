"""`detserve bench`: statistics, error counting against tiny local servers (HTTP and gRPC), run
limits, and the JSON / markdown outputs. No assertions on how fast anything is."""
from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from service.bench.inprocess import run_in_process
from service.bench.runner import LoadSpec, run_load, run_sweep
from service.bench.stats import RunResult, markdown_table, percentile, summarize
from service.bench.targets import make_target
from service.bench.wrk import parse_output
from service.cli import main

BODIES = [b"\xff\xd8fake-jpeg-%d" % i for i in range(3)]


# --- statistics -------------------------------------------------------------------------------

def test_percentiles_match_numpy_on_a_synthetic_set():
    rng = np.random.default_rng(3)
    values = sorted(rng.lognormal(1.0, 0.7, size=1001).tolist())
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentiles_exact_on_1_to_100():
    values = [float(x) for x in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_counts_errors_by_code_and_excludes_them_from_latency():
    codes = ["ok"] * 6 + ["503"] * 3 + ["429"] + ["timeout"] * 2
    r = summarize("x", "rest", [0.010] * 5 + [0.100], codes, duration_s=2.0, concurrency=4)
    assert (r.requests, r.ok) == (12, 6)
    assert r.errors == {"429": 1, "503": 3, "timeout": 2}
    assert r.throughput == pytest.approx(3.0)
    assert r.max_ms == pytest.approx(100.0)
    assert r.p50_ms == pytest.approx(10.0)


# --- a tiny HTTP server that answers with chosen status codes ---------------------------------

class CodeServer:
    """HTTP/1.1 keep-alive server; the n-th request (server-wide) gets codes[n % len(codes)].
    A code of 0 closes the connection without answering; `delay_s` holds each answer."""

    def __init__(self, codes, delay_s: float = 0.0, hang: bool = False):
        self.codes, self.delay_s, self.hang = codes, delay_s, hang
        self.count = 0
        self.bodies: list[bytes] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _client(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.bodies.append(await reader.readexactly(length))
                code = self.codes[self.count % len(self.codes)]
                self.count += 1
                if self.hang:
                    await asyncio.sleep(3600)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if code == 0:
                    writer.close()
                    return
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (code, len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_errors_are_counted_by_http_status(client):
    async def go():
        async with CodeServer([200, 200, 503, 429, 500]) as srv:
            target = make_target("rest", srv.url, "m", BODIES, client=client, pool_size=4)
            spec = LoadSpec(concurrency=4, requests=50, duration_s=None, warmup_s=0, progress=False)
            [result] = await run_sweep(target, [spec])
            return result, srv

    result, srv = asyncio.run(go())
    assert result.requests == 50 == srv.count
    assert result.ok == 20
    assert result.errors == {"429": 10, "500": 10, "503": 10}
    assert set(srv.bodies) == set(BODIES)  # bodies cycle through the corpus, sent unchanged


def test_dropped_connections_are_counted_and_the_run_goes_on():
    async def go():
        async with CodeServer([200, 0]) as srv:
            target = make_target("rest", srv.url, "m", BODIES)
            spec = LoadSpec(concurrency=2, requests=20, duration_s=None, warmup_s=0, progress=False)
            return (await run_sweep(target, [spec]))[0]

    result = asyncio.run(go())
    assert result.requests == 20
    assert result.ok >= 1
    assert sum(result.errors.values()) == 20 - result.ok
    assert set(result.errors) <= {"HttpError", "ConnectionResetError", "IncompleteReadError"}


def test_kserve_rest_raw_mode_sends_the_image_unchanged():
    async def go():
        async with CodeServer([200]) as srv:
            target = make_target("kserve-rest", srv.url, "m", BODIES[:1])
            spec = LoadSpec(concurrency=1, requests=3, duration_s=None, warmup_s=0, progress=False)
            return (await run_sweep(target, [spec]))[0], srv

    result, srv = asyncio.run(go())
    assert result.ok == 3 and srv.bodies == [BODIES[0]] * 3


# --- limits -----------------------------------------------------------------------------------

def test_duration_limit_stops_the_run():
    async def go():
        async with CodeServer([200], delay_s=0.02) as srv:
            target = make_target("rest", srv.url, "m", BODIES)
            await target.open()
            start = time.monotonic()
            result = await run_load(target, LoadSpec(concurrency=3, duration_s=0.5, warmup_s=0.2, progress=False))
            await target.close()
            return result, time.monotonic() - start

    result, wall = asyncio.run(go())
    assert wall < 5.0  # stopped by itself: 0.7 s of load plus in-flight requests
    assert result.ok > 0 and not result.errors
    assert result.duration_s == pytest.approx(0.5, abs=0.3)


def test_hung_server_ends_in_timeouts_not_a_hang():
    async def go():
        async with CodeServer([200], hang=True) as srv:
            target = make_target("rest", srv.url, "m", BODIES)
            spec = LoadSpec(concurrency=2, requests=4, duration_s=None, warmup_s=0, timeout_s=0.2, progress=False)
            start = time.monotonic()
            result = (await run_sweep(target, [spec]))[0]
            return result, time.monotonic() - start

    result, wall = asyncio.run(go())
    assert result.errors == {"timeout": 4} and result.ok == 0
    assert wall < 5.0


def test_open_loop_sends_at_the_requested_rate_whatever_the_server_does():
    async def go():
        async with CodeServer([200], delay_s=0.3) as srv:  # slower than the schedule: requests overlap
            target = make_target("rest", srv.url, "m", BODIES)
            spec = LoadSpec(concurrency=None, rate=40, duration_s=1.0, warmup_s=0.1, progress=False)
            return (await run_sweep(target, [spec]))[0]

    result = asyncio.run(go())
    assert 36 <= result.requests <= 44
    assert result.rate == 40 and result.concurrency is None
    assert result.p50_ms >= 300  # latency counts from the scheduled start


# --- gRPC ---------------------------------------------------------------------------------------

def test_grpc_errors_are_counted_by_status_name():
    grpc = pytest.importorskip("grpc")

    async def go():
        seen = []

        async def detect(request: bytes, context):
            seen.append(request)
            if len(seen) % 2 == 0:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            return b""

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "detserve.v1.Detector", {"Detect": grpc.unary_unary_rpc_method_handler(detect)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = make_target("grpc", f"127.0.0.1:{port}", "rtmdet", BODIES)
            spec = LoadSpec(concurrency=3, requests=30, duration_s=None, warmup_s=0, progress=False)
            return (await run_sweep(target, [spec]))[0], seen
        finally:
            await server.stop(None)

    result, seen = asyncio.run(go())
    assert result.requests == 30 == len(seen)
    assert result.ok == 15 and result.errors == {"RESOURCE_EXHAUSTED": 15}
    from service.protocols.grpc.generated import detserve_pb2 as pb

    request = pb.DetectRequest.FromString(seen[0])
    assert request.model == "rtmdet" and request.image.encoded in BODIES


# --- in-process ---------------------------------------------------------------------------------

class CountingPredictor:
    backend_name = "fake"

    def __init__(self):
        self.batches: list[int] = []

    def predict(self, images, options):
        from service.types import DetectResult

        self.batches.append(len(images))
        time.sleep(0.002)
        return [DetectResult(detections=[], image_width=1, image_height=1, model_name="f", model_version="f")
                for _ in images]


def test_in_process_closed_loop_batches_up_to_max_and_stops_at_the_count():
    pred = CountingPredictor()
    result = run_in_process(pred, BODIES, concurrency=5, max_batch_size=2, requests=40, duration_s=None,
                            warmup_s=0, progress=False)
    assert max(pred.batches) == 2
    assert result.ok == 5 + 40  # the 5 first submissions are measured too (no warm-up)
    assert result.extra["mean_batch"] <= 2


def test_in_process_with_the_null_arch(tmp_path):
    from service.pipeline.predictor import Predictor
    from service.settings import load_model_config

    (tmp_path / "model.toml").write_text('name = "null"\narch = "null"\n')
    pred = Predictor.from_config(load_model_config(tmp_path))
    result = run_in_process(pred, BODIES, concurrency=1, max_batch_size=8, requests=10, duration_s=None,
                            warmup_s=0, progress=False)
    assert result.ok == 11 and not result.errors


# --- outputs ------------------------------------------------------------------------------------

def test_markdown_table_is_well_formed_and_json_has_no_nan():
    ok = summarize("a|b", "rest", [0.001, 0.002], ["ok", "ok", "503"], 1.0, concurrency=4)
    empty = summarize("none", "grpc", [], ["UNAVAILABLE"], 1.0, rate=5.0)
    table = markdown_table([ok, empty]).strip().splitlines()
    assert len(table) == 4
    widths = {line.count(" | ") for line in table if not line.startswith("|---")}
    assert len(widths) == 1  # every row has the header's columns (the '|' in the label is escaped)
    assert "503:1" in table[2] and "UNAVAILABLE:1" in table[3]
    text = json.dumps([ok.to_json(), empty.to_json()], allow_nan=False)
    back = json.loads(text)
    assert back[1]["p50_ms"] is None and back[0]["errors"] == {"503": 1}
    assert RunResult(**back[0]).ok == 2


def test_cli_run_writes_json_and_markdown(tmp_path, capsys):
    async def serve_and_run():
        async with CodeServer([200, 404]) as srv:
            images = tmp_path / "imgs"
            images.mkdir()
            for i, body in enumerate(BODIES):
                (images / f"{i}.jpg").write_bytes(body)
            argv = ["bench", "run", "--target", "rest", "--url", srv.url, "--model", "m", "--concurrency", "1,2",
                    "--requests", "10", "--warmup", "0", "--images", str(images), "--no-progress",
                    "--json", str(tmp_path / "out.json"), "--markdown", str(tmp_path / "out.md")]
            return await asyncio.to_thread(main, argv)

    assert asyncio.run(serve_and_run()) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert [d["concurrency"] for d in data] == [1, 2]
    assert all(d["requests"] == 10 and d["ok"] == 5 and d["errors"] == {"404": 5} for d in data)
    md = (tmp_path / "out.md").read_text()
    assert md.count("\n") == 4 and "404:5" in md
    assert "| run |" in capsys.readouterr().out


WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.10ms    1.20ms  31.50ms   90.00%
    Req/Sec     3.90k   200.00     4.20k    70.00%
  Latency Distribution
     50%    3.90ms
     75%    4.50ms
     90%    5.20ms
     99%  850.00us 
  38812 requests in 10.00s, 5.10MB read
  Non-2xx or 3xx responses: 12
Requests/sec:   3881.20
Transfer/sec:    522.00KB
"""


def test_wrk_output_is_parsed():
    r = parse_output(WRK_OUTPUT, "wrk", 16, 10.0)
    assert r.requests == 38812 and r.errors == {"non-2xx": 12} and r.ok == 38800
    assert r.p50_ms == pytest.approx(3.9) and r.p99_ms == pytest.approx(0.85) and r.max_ms == pytest.approx(31.5)
    assert r.throughput == pytest.approx(3881.2 * 38800 / 38812)


def test_wrk_sends_each_rest_door_its_own_request(tmp_path, monkeypatch):
    """The KServe REST door is loaded by wrk as the Python client's raw mode loads it."""
    import subprocess

    from service.bench import wrk

    scripts = {}

    def fake_run(cmd, **kwargs):
        scripts[cmd[-1]] = open(cmd[cmd.index("-s") + 1]).read()
        return subprocess.CompletedProcess(cmd, 0, WRK_OUTPUT, "")

    monkeypatch.setattr(wrk.subprocess, "run", fake_run)
    wrk.run_wrk("http://127.0.0.1:1", "null", BODIES, concurrency=16, duration_s=1, kind="kserve-rest")
    lua = scripts["http://127.0.0.1:1"]
    assert 'wrk.format("POST", "/v2/models/null/infer", nil' in lua
    assert 'wrk.headers["Inference-Header-Content-Length"] = "0"' in lua
    wrk.run_wrk("http://127.0.0.1:1", "null", BODIES, concurrency=16, duration_s=1)
    assert 'wrk.format("PUT", "/predictions/null", nil' in scripts["http://127.0.0.1:1"]


def test_h2load_log_and_server_side_grpc_errors_make_one_result():
    from service.bench import h2load

    log = "".join(f"17962068710{i:05d}\t200\t{1000 * (i + 1)}\n" for i in range(100)) + "1796206871099999\t503\t10\n"
    latencies, errors = h2load.parse_log(log)
    assert len(latencies) == 100 and errors == {"http-503": 1}
    # the server counted 4 of the HTTP 200 streams as RESOURCE_EXHAUSTED (gRPC status in trailers)
    r = h2load.result("x", 16, 2.0, latencies, {**errors, "RESOURCE_EXHAUSTED": 4})
    assert (r.requests, r.ok, r.throughput) == (101, 96, 48.0)
    assert r.p50_ms == pytest.approx(50.5) and r.max_ms == 100.0
    assert h2load.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    cmd = h2load.command("127.0.0.1:7070", "/detserve.v1.Detector/Detect", "b", "l", concurrency=16,
                         duration_s=8, warmup_s=2, channels=2)
    assert cmd[cmd.index("-c") + 1] == "2" and cmd[cmd.index("-m") + 1] == "8"
    assert cmd[-1] == "http://127.0.0.1:7070/detserve.v1.Detector/Detect" and "--warm-up-time=2" in cmd


@pytest.mark.integration
@pytest.mark.skipif(not __import__("shutil").which("h2load"), reason="h2load (Debian nghttp2-client) not installed")
def test_h2load_against_a_real_grpc_door_counts_server_side_errors(tmp_path):
    """A real server: an unknown model is NOT_FOUND in gRPC trailers after HTTP 200, which h2load
    alone would count as success."""
    from fakes import write_model
    from serve_process import ServeProcess

    from service.bench import h2load

    write_model(tmp_path / "store", "m", workers=1)
    proc = ServeProcess(tmp_path / "store", tmp_path, grpc=True)
    proc.wait_ready()
    try:
        address, metrics = f"127.0.0.1:{proc.ports['grpc']}", proc.metrics
        good, cmd = h2load.run_h2load(address, "grpc", "m", BODIES, concurrency=4, duration_s=1, warmup_s=0,
                                      metrics_url=metrics)
        assert good.ok > 0 and good.errors == {} and "h2load -D 1" in cmd
        kserve, _ = h2load.run_h2load(address, "kserve-grpc", "m", BODIES, concurrency=4, duration_s=1,
                                      warmup_s=0, metrics_url=metrics)
        assert kserve.ok > 0 and kserve.errors == {}
        bad, _ = h2load.run_h2load(address, "grpc", "absent", BODIES, concurrency=4, duration_s=1, warmup_s=0,
                                   metrics_url=metrics)
        assert bad.ok == 0 and bad.errors.get("NOT_FOUND", 0) > 0
    finally:
        proc.stop()


def test_the_c1_gap_is_the_median_of_per_round_differences_paired_by_round():
    from service.bench.render import targets

    def row(label, p50):
        return {"label": label, "target": "x", "concurrency": 1, "rate": None, "requests": 10, "ok": 10,
                "errors": {}, "duration_s": 8.0, "throughput": 30.0, "p50_ms": p50, "p90_ms": p50,
                "p99_ms": p50, "max_ms": p50, "mean_ms": p50}

    # the machine drifts: both sides move together from round to round, the served side ~0.5 ms above
    inproc = [20.0, 30.0, 25.0, 40.0]
    served = [20.4, 30.6, 31.0, 40.5]  # one noisy round (+6 ms)
    latency = ([row(f"in-process rtmdet c1 #{i + 1}", v) for i, v in enumerate(inproc)]
               + [row(f"detserve rtmdet REST c1 #{i + 1}", v) for i, v in enumerate(served)])
    (gap,) = [t for t in targets({"sections": {"latency": latency}}) if "served p50 - in-process" in t["name"]]
    assert gap["measured"] == pytest.approx(0.55) and gap["met"] is True  # the mean difference would be 1.9
    assert "+6.00" in gap["detail"]


def test_steal_share_is_the_stolen_part_of_the_cpu_time_between_two_readings():
    from service.bench.setup import cpu_times, steal_share

    before = [100, 0, 20, 800, 10, 0, 0, 70, 40, 0]  # guest time (40) is already inside user
    after = [200, 0, 40, 900, 10, 0, 0, 150, 90, 0]
    assert steal_share(before, after) == pytest.approx(80 / 300)
    assert steal_share(before, before) is None and steal_share(None, after) is None
    now = cpu_times()
    assert len(now) >= 8 and 0.0 <= (steal_share(now, cpu_times()) or 0.0) <= 1.0


def test_the_report_says_when_other_guests_stole_cpu_time():
    from service.bench.render import render_markdown
    from service.bench.report import ReportOptions
    from service.bench.servers import ROOT

    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    data["facts"]["steal_share"] = 0.35
    assert "stolen by the hypervisor during the run: 35% - **other guests shared these cores**" \
        in render_markdown(data, ReportOptions())
    data["facts"]["steal_share"] = 0.01
    assert "during the run: 1% (a quiet VM shows about 0%)." in render_markdown(data, ReportOptions())


def test_each_recorded_run_carries_the_cpu_share_stolen_while_it_ran():
    from service.bench.report import Recorder

    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat: the report states no steal there")
    rec = Recorder()
    rec.begin()
    sum(i * i for i in range(2_000_000))  # some CPU time, so the interval is not empty
    rec.add("overhead", summarize("x", "rest", [0.001], ["ok"], 1.0), "cmd", "detserve")
    (raw,) = rec.sections["overhead"]
    assert raw["extra"]["system"] == "detserve" and 0.0 <= raw["extra"]["steal"] <= 1.0


def test_a_section_names_the_runs_that_lost_cpu_time_to_other_guests():
    from service.bench.render import render_markdown
    from service.bench.report import ReportOptions
    from service.bench.servers import ROOT

    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    for section in data["sections"].values():  # whatever the committed run lost, only one run here
        for raw in section:
            raw["extra"]["steal"] = 0.02
    runs = data["sections"]["overhead"]
    runs[1]["extra"]["steal"] = 0.27
    text = render_markdown(data, ReportOptions())
    assert f"the system measured): {runs[1]['label']} 27%." in text
    assert text.count("Runs that lost at least 10% of the CPU time") == 1


def test_the_torchserve_ratio_also_shows_the_pairing_with_the_run_beside_its_best_variant():
    from service.bench.render import targets
    from service.bench.servers import ROOT

    data = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    rows = data["sections"]["torchserve"]
    best = max((r for r in rows if r["label"].startswith("TorchServe mmdet-style c16")), key=lambda r: r["throughput"])
    (ours,) = [r for r in rows if r["label"] == f"detserve rtmdet REST c16 (before {best['extra']['ts_variant']})"]
    (t,) = [t for t in targets(data) if t["name"].startswith("rtmdet as shipped / TorchServe mmdet-style at its best, thr")]
    assert f"just before that variant: {ours['throughput'] / best['throughput']:.2f}x" in t["detail"]


def test_a_run_recorded_without_begin_counts_its_steal_from_the_last_run_recorded(monkeypatch):
    from service.bench import report
    from service.bench.report import Recorder

    readings = iter([[0, 0, 0, 100, 0, 0, 0, 0], [0, 0, 0, 200, 0, 0, 0, 100], [0, 0, 0, 300, 0, 0, 0, 100]])
    monkeypatch.setattr(report, "_cpu_times_or_none", lambda: next(readings))
    rec = Recorder()
    for label in ("robbed", "after it"):
        rec.add("two-stage", summarize(label, "rest", [0.001], ["ok"], 1.0), "cmd", "detserve")
    assert [raw["extra"]["steal"] for raw in rec.sections["two-stage"]] == [0.5, 0.0]
