"""The real server on loopback: `detserve serve` as a subprocess with spawned worker processes, hit by
curl and httpx. The workers run tests/fakes.py's scripted predictor (bytes b"SLEEP:0.2" sleep,
b"BAD" is an invalid image), so timing-dependent behaviour (overload, drain, worker kills) is
deterministic; everything between the socket and the predictor is the production code.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
from fakes import write_model  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

MAX_REQUEST_SIZE = 1_000_000


def start_server(store: Path, workdir: Path, models: list[str], drain_timeout_s: float = 20, fake: bool = True,
                 max_request_size: int = MAX_REQUEST_SIZE) -> ServeProcess:
    config = f"max_request_size = {max_request_size}\ndrain_timeout_s = {drain_timeout_s}\n"
    return ServeProcess(store, workdir, models=models, config=config, fake=fake)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest-server")
    store = root / "store"
    write_model(store, "fast", workers=2, batch={"max_batch_size": 8})
    write_model(store, "smallq", workers=1, batch={"max_batch_size": 1, "max_queue_size": 2})
    write_model(store, "spare", workers=1)  # not loaded at start-up: the management test loads it
    srv = start_server(store, root, ["fast", "smallq"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log()


async def fire(url: str, bodies: list[bytes], headers: dict | None = None, timeout: float = 30) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(client.put(url, content=b, headers=headers) for b in bodies))


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)


def histogram(metrics_text: str, name: str, model: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)",model="{model}"}} (\S+)$', metrics_text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def accepted(metrics_response: httpx.Response, model: str) -> float:
    """Requests the server holds for `model`: waiting in the queue, running, or already answered."""
    total = 0.0
    for name in ("detserve_queue_depth", "detserve_in_flight", "detserve_requests_total"):
        for m in re.finditer(rf'^{name}{{([^}}]*)}} (\S+)$', metrics_response.text, re.M):
            if f'model="{model}"' in m.group(1):
                total += float(m.group(2))
    return total


def test_curl_put_and_multipart(server, tmp_path):
    image = tmp_path / "img.jpg"
    image.write_bytes(b"ok-pretend-jpeg")
    r = curl("-D", "-", "-T", str(image), f"{server.url}/predictions/fast")
    assert "HTTP/1.1 200" in r.stdout and r.stdout.rstrip().endswith("[]")
    assert re.search(r"(?im)^x-request-id: [0-9a-f]{32}\r?$", r.stdout)
    r = curl("-D", "-", "-H", "X-Request-ID: my-id-1", "-F", f"data=@{image}", f"{server.url}/predictions/fast")
    assert "HTTP/1.1 200" in r.stdout and re.search(r"(?im)^x-request-id: my-id-1\r?$", r.stdout)
    r = curl("-F", f"a=@{image}", "-F", f"b=@{image}", f"{server.url}/predictions/fast")
    assert r.stdout == "[[],[]]"


def test_bad_inputs_get_4xx_json_and_server_stays_healthy(server, tmp_path):
    url = f"{server.url}/predictions/fast"
    cases = {
        "empty": (dict(content=b""), 400, "invalid_image"),
        "not an image": (dict(content=b"BAD bytes"), 400, "invalid_image"),
        "text": (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        "too big": (dict(content=b"\xff" * (MAX_REQUEST_SIZE + 1)), 413, "payload_too_large"),
        "bad query": (dict(content=b"ok", params={"score_thr": "7"}), 400, "invalid_request"),
        "unknown model": (dict(content=b"ok"), 404, "model_not_found"),
    }
    for name, (kwargs, status, code) in cases.items():
        target = f"{server.url}/predictions/nope" if name == "unknown model" else url
        r = httpx.put(target, timeout=10, **kwargs)
        assert (r.status_code, r.json()["code"]) == (status, code), name
        assert r.json()["request_id"] == r.headers["x-request-id"]
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (MAX_REQUEST_SIZE * 3))
    r = curl("-w", "\n%{http_code}", "-T", str(big), url)
    assert r.stdout.endswith("413"), r
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.put(url, content=b"ok").status_code == 200


def test_request_timeout_header_gives_504(server):
    r = httpx.put(f"{server.url}/predictions/fast", content=b"SLEEP:1.5", headers={"X-Request-Timeout-Ms": "200"},
                  timeout=10)
    assert r.status_code == 504 and r.json()["code"] == "deadline_exceeded"


def test_overload_gives_only_200_and_429_with_retry_after(server):
    responses = asyncio.run(fire(f"{server.url}/predictions/smallq", [b"SLEEP:0.2"] * 30))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429}, codes
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    assert all(r.json()["code"] == "overloaded" for r in responses if r.status_code == 429)


def test_200_concurrent_requests_succeed_in_batches(server):
    before = histogram(httpx.get(f"{server.metrics}/metrics").text, "detserve_batch_size", "fast")
    started = time.monotonic()
    responses = asyncio.run(fire(f"{server.url}/predictions/fast", [b"SLEEP:0.02"] * 200))
    assert [r.status_code for r in responses] == [200] * 200
    assert time.monotonic() - started < 60  # generous: the CI box is shared
    after = histogram(httpx.get(f"{server.metrics}/metrics").text, "detserve_batch_size", "fast")
    batches = after["+Inf"] - before.get("+Inf", 0)
    single = after["1.0"] - before.get("1.0", 0)
    assert batches > single, f"no batch larger than 1 among {batches} batches"
    text = httpx.get(f"{server.metrics}/metrics").text
    assert re.search(r'detserve_requests_total{code="200",model="fast",protocol="rest"} (\d+)', text)


def test_worker_sigkill_during_load_recovers(server):
    (desc,) = httpx.get(f"{server.mgmt}/models/fast").json()
    victim = desc["workers"][0]["pid"]

    async def load_and_kill():
        task = asyncio.ensure_future(fire(f"{server.url}/predictions/fast", [b"SLEEP:0.15"] * 60, timeout=40))
        await asyncio.sleep(0.2)  # both workers are mid-batch now
        os.kill(victim, signal.SIGKILL)
        return await task

    started = time.monotonic()
    responses = asyncio.run(load_and_kill())
    assert time.monotonic() - started < 35  # nothing hung
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (desc,) = httpx.get(f"{server.mgmt}/models/fast").json()
        if desc["liveWorkers"] == 2:
            break
        time.sleep(0.2)
    assert victim not in [w["pid"] for w in desc["workers"]]
    later = asyncio.run(fire(f"{server.url}/predictions/fast", [b"ok"] * 20))
    assert [r.status_code for r in later] == [200] * 20


def test_management_load_scale_batch_unload(server):
    predict = f"{server.url}/predictions/spare"
    assert httpx.put(predict, content=b"ok").status_code == 404
    r = httpx.post(f"{server.mgmt}/models", params={"model_name": "spare", "initial_workers": 1}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.put(predict, content=b"ok").status_code == 200
    assert "spare" in [m["modelName"] for m in httpx.get(f"{server.mgmt}/models").json()["models"]]

    r = httpx.put(f"{server.mgmt}/models/spare", params={"min_worker": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"]["liveWorkers"] == 2
    pids = {w["pid"] for w in r.json()["model"]["workers"]}
    assert len(pids) == 2
    r = httpx.put(f"{server.mgmt}/models/spare/batch", json={"max_batch_size": 2, "max_queue_size": 5})
    assert (r.json()["model"]["batchSize"], r.json()["model"]["maxQueueSize"]) == (2, 5)
    r = httpx.put(f"{server.mgmt}/models/spare", params={"min_worker": 1}, timeout=60)
    assert len(r.json()["model"]["workers"]) == 1

    assert httpx.delete(f"{server.mgmt}/models/spare", timeout=60).status_code == 200
    assert httpx.put(predict, content=b"ok").status_code == 404
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    # An unloaded model leaves no series behind: `detserve_live_workers{model="spare"} 0` would
    # read as an outage to an alert rule.
    assert 'model="spare"' not in httpx.get(f"{server.metrics}/metrics").text

    # Loaded again under the same name, it is counted afresh.
    r = httpx.post(f"{server.mgmt}/models", params={"model_name": "spare", "initial_workers": 1}, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.put(predict, content=b"ok").status_code == 200
    text = httpx.get(f"{server.metrics}/metrics").text
    assert 'detserve_requests_total{code="200",model="spare",protocol="rest"} 1.0' in text, text
    assert 'detserve_live_workers{model="spare"} 1.0' in text
    assert httpx.delete(f"{server.mgmt}/models/spare", timeout=60).status_code == 200


def test_sigterm_during_load_completes_accepted_requests(tmp_path):
    store = tmp_path / "store"
    write_model(store, "slow", workers=1, batch={"max_batch_size": 4})
    srv = start_server(store, tmp_path, ["slow"])
    try:
        srv.wait_ready()

        async def load_then_term():
            task = asyncio.ensure_future(fire(f"{srv.url}/predictions/slow", [b"SLEEP:0.5"] * 12, timeout=60))
            # SIGTERM once the server holds every request (queued, running or answered), so all were accepted.
            async with httpx.AsyncClient() as client:
                while accepted(await client.get(f"{srv.metrics}/metrics"), "slow") < 12:
                    await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            return await task

        responses = asyncio.run(load_then_term())
        assert [r.status_code for r in responses] == [200] * 12
        assert srv.proc.wait(30) == 0, srv.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/ping", timeout=2)
    finally:
        srv.stop()


# ---- the real predictor: decoding, limits and the bundled model's answers ----------------------

HAS_PREDICTOR = importlib.util.find_spec("service.pipeline.predictor") is not None
needs_predictor = pytest.mark.skipif(not HAS_PREDICTOR, reason="service.pipeline.predictor not built yet")
BUNDLED = REPO / "models" / "rtmdet"
# The folder first holds random placeholder weights; the model card arrives with the trained ones.
HAS_TRAINED_MODEL = (BUNDLED / "model.toml").is_file() and (BUNDLED / "MODEL_CARD.md").is_file()


def write_random_tiny_model(store: Path, name: str) -> None:
    """rtmdet-tiny with random weights: exercises decode -> model -> postprocess at CPU speed."""
    import torch

    from service.demo.dataset import CLASSES
    from service.detectors.checkpoint import save_checkpoint
    from service.detectors.registry import build_detector

    folder = store / name
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(folder / "weights.pth", build_detector("rtmdet-tiny", len(CLASSES)).state_dict(), list(CLASSES))
    (folder / "model.toml").write_text(
        'backend = "eager"\narch = "rtmdet-tiny"\nweights = "weights.pth"\ninput_size = 320\nmax_image_pixels = 20000000\n'
        "[workers]\ncount = 1\n[batch]\nmax_batch_size = 4\n")


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rest-real")
    store = root / "store"
    write_random_tiny_model(store, "tiny")
    models = ["tiny"]
    if HAS_TRAINED_MODEL:
        (store / "rtmdet").symlink_to(BUNDLED)
        models.append("rtmdet")
    srv = start_server(store, root, models, fake=False, max_request_size=32 * 1024 * 1024)
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()


def shapes_image(width: int, height: int, seed: int, ext: str = ".jpg"):
    import cv2
    import numpy as np

    from service.demo.dataset import render_sample

    # Shapes at least 8% of the short side: this checks the serving path's rescaling, not the
    # small-object recall of a tiny CPU-trained model (that is the model card's AP figure).
    image, anns = render_sample(np.random.default_rng(seed), width, height, max_shapes=5, min_radius_frac=0.08)
    ok, encoded = cv2.imencode(ext, image)
    assert ok
    return encoded.tobytes(), anns


def png_header(width: int, height: int) -> bytes:
    """A small PNG file that declares width x height: IHDR, a few compressed rows, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@needs_predictor
def test_real_image_json_and_rendered(real_server, tmp_path):
    data, _ = shapes_image(640, 480, seed=1)
    image = tmp_path / "shapes.jpg"
    image.write_bytes(data)
    r = curl("-T", str(image), f"{real_server.url}/predictions/tiny?score_thr=0")
    detections = __import__("json").loads(r.stdout)
    assert isinstance(detections, list) and detections, r.stdout[:500]
    assert set(detections[0]) == {"class_label", "class_name", "bbox", "score"}
    x1, y1, x2, y2 = detections[0]["bbox"]
    assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG")):
        r = httpx.put(f"{real_server.url}/predictions/tiny", content=data,
                      params={"format": "image", "image_format": fmt}, timeout=30)
        assert r.status_code == 200 and r.content.startswith(magic), (fmt, r.text[:200])
        from PIL import Image
        import io

        assert Image.open(io.BytesIO(r.content)).size == (640, 480)


@needs_predictor
def test_bad_images_get_4xx_and_workers_survive(real_server):
    url = f"{real_server.url}/predictions/tiny"
    data, _ = shapes_image(640, 480, seed=2)
    cases = {
        "zero bytes": (b"", {}),
        "truncated jpeg": (data[: len(data) // 3], {}),
        "text": (b"hello, I am not an image\n", {}),
        "text content-type": (b"hello", {"content-type": "text/plain"}),
        "50000x50000 png": (png_header(50_000, 50_000), {}),
        "random bytes": (bytes(range(256)) * 10, {}),
    }
    for name, (body, headers) in cases.items():
        r = httpx.put(url, content=body, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert set(r.json()) == {"code", "message", "request_id"}, name
        if name == "50000x50000 png":
            assert r.status_code == 413 and r.json()["code"] == "image_too_large"
    (desc,) = httpx.get(f"{real_server.mgmt}/models/tiny").json()
    assert [w["restarts"] for w in desc["workers"]] == [0]
    assert httpx.get(f"{real_server.url}/readyz").status_code == 200
    assert httpx.put(url, content=data, timeout=30).status_code == 200


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@needs_predictor
@pytest.mark.skipif(not HAS_TRAINED_MODEL, reason="trained models/rtmdet not shipped yet")
@pytest.mark.parametrize("size,ext,how", [((1200, 800), ".jpg", "curl-T"), ((300, 520), ".png", "multipart"),
                                          pytest.param((4000, 3000), ".jpg", "curl-T", marks=pytest.mark.slow)])
def test_bundled_model_finds_the_ground_truth(real_server, tmp_path, size, ext, how):
    from service.demo.dataset import CLASSES

    data, anns = shapes_image(*size, seed=123 + size[0], ext=ext)
    image = tmp_path / f"img{ext}"
    image.write_bytes(data)
    url = f"{real_server.url}/predictions/rtmdet"
    r = curl("-T", str(image), url) if how == "curl-T" else curl("-F", f"data=@{image}", url)
    detections = __import__("json").loads(r.stdout)
    for ann in anns:
        best = max((box_iou(ann.box_xyxy, d["bbox"]) for d in detections if d["class_name"] == CLASSES[ann.label]),
                   default=0.0)
        assert best >= 0.7, (CLASSES[ann.label], ann.box_xyxy, detections)


@pytest.mark.slow
@pytest.mark.skipif(not (BUNDLED / "demo.jpg").is_file(), reason="models/rtmdet/demo.jpg not shipped yet")
def test_docs_api_curl_examples_work(tmp_path):
    """Every curl line of docs/api.md, against `detserve serve --model-store models` on free ports."""
    (tmp_path / "models").symlink_to(REPO / "models")
    srv = start_server(REPO / "models", tmp_path, ["rtmdet", "rtmdet-ins"], fake=False, max_request_size=16 * 1024 * 1024)
    try:
        srv.wait_ready(180)
        ports = {"8080": srv.ports["inference"], "8081": srv.ports["management"], "8082": srv.ports["metrics"]}
        lines = [ln for ln in (REPO / "docs" / "api.md").read_text().splitlines() if ln.startswith("curl ")]
        assert len(lines) > 15
        for line in lines:
            for default, port in ports.items():
                line = line.replace(f"localhost:{default}", f"localhost:{port}")
            r = subprocess.run(["bash", "-c", line.replace("curl ", "curl -sS ", 1)], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (line, r.stderr)
            expect_error = '--data-binary ""' in line
            assert ('"code":' in r.stdout) == expect_error, (line, r.stdout[:300])
    finally:
        assert srv.stop() == 0, srv.log()
