"""Acceptance for issue 5 against the real server (`service.server.serve`: uvicorn + gRPC + engine)
on loopback: tritonclient over HTTP and gRPC, a plain grpcio client built from proto/detserve.proto,
the detserve Python client over both protocols, shared batches, and error status codes.

The engine runs inline with `DetectingPredictor` below (deterministic detections from the image's
pixels), so the test needs no weights and stays fast; the doors, scheduler and metrics are real.
"""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service import errors
from service.client import AsyncDetserveClient, DetserveClient
from service.types import DetectResult, Detection, RawImage

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "grpc_scripts"
TRITON_VENV = REPO / ".venv-triton"
CLASSES = ("circle", "square", "triangle")
MODEL = "shapes"


class DetectingPredictor:
    """Decodes the image and reports 1-3 boxes derived from its size and mean colour; sleeps a
    little per batch so concurrent requests queue up and share batches."""

    def __init__(self, cfg):
        self.name, self.version, self.arch = cfg.name, f"{cfg.name}-test0001", cfg.arch
        self.classes, self.has_masks, self.input_size = CLASSES, False, cfg.input_size
        self.device, self.backend_name = "cpu", "test"

    @classmethod
    def from_config(cls, cfg, *, device=None, threads=None, **kwargs):
        return cls(cfg)

    def predict(self, images, options):
        # b"BUSY" holds the worker for a while, so the requests sent meanwhile queue up together.
        time.sleep(0.8 if any(getattr(i, "data", b"") == b"BUSY" for i in images) else 0.02)
        return [self._one(image, opt) for image, opt in zip(images, options)]

    def _one(self, image, options):
        try:
            if isinstance(image, RawImage):
                pixels = np.frombuffer(image.pixels, np.uint8).reshape(image.height, image.width, 3)
            else:
                pixels = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
        except Exception:  # noqa: BLE001
            return errors.InvalidImage("cannot decode image (test predictor)")
        h, w, _ = pixels.shape
        mean = int(pixels.mean())
        dets = [Detection(i % 3, CLASSES[i % 3], round(0.9 - 0.17 * i - mean / 10_000, 4),
                          (w * 0.1 * i + 0.25, h * 0.05 * i, w * (0.5 + 0.1 * i) + 0.125, h * 0.75))
                for i in range(1 + mean % 3)]
        if options.classes:
            dets = [d for d in dets if d.class_name in options.classes]
        if options.score_thr is not None:
            dets = [d for d in dets if d.score >= options.score_thr]
        return DetectResult(dets[: options.max_dets or None], w, h, self.name, self.version)

    def close(self):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(color, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


class Server:
    """`service.server.serve` on free loopback ports in a background thread, inline engine."""

    def __init__(self, store: Path, factory: str | None, models: list[str] | None = None):
        from service.engine.engine import Engine
        from service.server import serve
        from service.settings import ServerSettings

        self.settings = ServerSettings(
            model_store=store, models=models, inference_address="127.0.0.1", inference_port=_free_port(),
            management_address="127.0.0.1", management_port=_free_port(), metrics_address="127.0.0.1",
            metrics_port=_free_port(), grpc_address="127.0.0.1", grpc_port=_free_port(),
            max_request_size=2 * 1024 * 1024, drain_timeout_s=2,
        )
        self.http = f"http://127.0.0.1:{self.settings.inference_port}"
        self.management = f"http://127.0.0.1:{self.settings.management_port}"
        self.grpc = f"127.0.0.1:{self.settings.grpc_port}"
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        engine = Engine(self.settings, inline=True, predictor_factory=factory)
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(serve(self.settings, engine=engine, stop_event=self._stop),),
            daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.http}/v2/health/ready", timeout=1).status_code == 200:
                    grpc.channel_ready_future(grpc.insecure_channel(self.grpc)).result(timeout=5)
                    return
            except (httpx.HTTPError, grpc.FutureTimeoutError):
                pass
            if not self._thread.is_alive():
                break
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fakes import write_model

    store = tmp_path_factory.mktemp("store")
    write_model(store, MODEL, batch={"max_batch_size": 16})
    srv = Server(store, f"{__name__}:DetectingPredictor.from_config")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate([(200, 30, 30), (10, 200, 90), (120, 120, 250)]):
        path = folder / f"img{i}.jpg"
        path.write_bytes(_jpeg(color, (96 + 16 * i, 64 + 8 * i)))
        paths.append(path)
    return paths


def _predictions(server, path: Path, model: str = MODEL) -> list[dict]:
    res = httpx.post(f"{server.http}/predictions/{model}", content=path.read_bytes(), timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def _ensure_triton_venv() -> Path:
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        created = subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], capture_output=True)
        if created.returncode != 0:
            pytest.skip(f"cannot create {TRITON_VENV}: {created.stderr.decode()[-300:]}")
    probe = subprocess.run([str(python), "-c", "import tritonclient.http, tritonclient.grpc"], capture_output=True)
    if probe.returncode != 0:
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "tritonclient[http,grpc]", "numpy"],
                             capture_output=True, timeout=600)
        if pip.returncode != 0:
            pytest.skip(f"pip could not install tritonclient into {TRITON_VENV}: {pip.stderr.decode()[-300:]}")
    return python


def _triton_matches_predictions(server, model: str, images: list[Path], has_masks: bool = False,
                                batch_invariant: bool = True) -> list[list[dict]]:
    """tritonclient.http and .grpc: live, ready, metadata, infer (and stream) equal /predictions.

    A real model's scores can move in the last bits with the batch an image ran in, which can flip
    a borderline detection; for those (`batch_invariant=False`) every request carries one image."""
    python = _ensure_triton_venv()
    mode = "batch" if batch_invariant else "single"
    run = subprocess.run(
        [str(python), str(SCRIPTS / "triton_check.py"), mode, server.http.removeprefix("http://"), server.grpc, model,
         *map(str, images)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    expected = [_predictions(server, p, model) for p in images]
    outputs = ["boxes", "scores", "labels", "num_detections"] + (["masks_rle"] if has_masks else [])
    for kind in ("http", "grpc"):
        seen = report[kind]
        assert seen["live"] and seen["ready"] and seen["model_ready"], kind
        assert seen["metadata"]["name"] == model and seen["id"] == "req-7"
        assert [o["name"] for o in seen["metadata"]["outputs"]] == outputs
        out = seen["outputs"]
        assert out["num_detections"] == [len(e) for e in expected], kind
        for i, dets in enumerate(expected):
            for j, det in enumerate(dets):
                assert out["labels"][i][j] == det["class_label"]
                assert out["scores"][i][j] == pytest.approx(det["score"], abs=1e-5)
                assert out["boxes"][i][j] == pytest.approx(det["bbox"], abs=0.01)
                if has_masks:
                    assert json.loads(out["masks_rle"][i][j]) == det["segmentation"]
            assert all(s == 0 for s in out["scores"][i][len(dets):])  # zero padding up to K
    if batch_invariant:
        assert report["stream"] == [[f"s{i}", [len(e)]] for i, e in enumerate(expected)]
    else:  # stream requests are in flight together, so they may share a batch
        assert [r[0] for r in report["stream"]] == [f"s{i}" for i in range(len(images))]
    return expected


def test_tritonclient_http_and_grpc_match_predictions(server, images):
    _triton_matches_predictions(server, MODEL, images)


def test_plain_grpcio_client_detect_batch_stream_and_health(server, images, tmp_path):
    generated = tmp_path / "gen"
    generated.mkdir()
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}", f"--python_out={generated}",
                    f"--grpc_python_out={generated}", str(REPO / "proto" / "detserve.proto")], check=True)
    run = subprocess.run([sys.executable, str(SCRIPTS / "plain_grpc_client.py"), str(generated), server.grpc, MODEL,
                          str(images[0])], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    expected = _predictions(server, images[0])
    assert [[d["class_label"], d["class_name"], d["score"]] for d in expected] == [d[:3] for d in report["detect"]]
    for det, got in zip(expected, report["detect"]):
        assert got[3] == pytest.approx(det["bbox"], abs=0.01)
    assert report["size"] == [96, 64]
    assert report["batch"] == [len(expected)] * 3
    assert report["stream_ids"] == [1000 + i for i in range(100)] and report["stream_ok"]
    assert report["health"] == "SERVING" and report["model_health"] == "SERVING"


def _metric(server, name: str, labels: dict) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.settings.metrics_port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_grpc_and_rest_share_batches(server, images):
    data = images[1].read_bytes()
    mixed = {"model": MODEL, "batch_mix": "mixed"}
    before = {door: _metric(server, "detserve_batch_items_total", {**mixed, "protocol": door}) for door in ("rest", "grpc")}
    client = DetserveClient(grpc=server.grpc, model=MODEL, retries=0)
    clients = [client]
    try:
        def rest_call(_):
            return httpx.post(f"{server.http}/predictions/{MODEL}", content=data, timeout=30).status_code

        def grpc_call(_):
            return len(client_for_thread().detect_batch([data] * 2))

        local = threading.local()

        def client_for_thread():  # a sync client owns its event loop: one per thread
            if not hasattr(local, "client"):
                local.client = DetserveClient(grpc=server.grpc, model=MODEL)
                clients.append(local.client)
            return local.client

        with ThreadPoolExecutor(10) as pool:
            busy = pool.submit(lambda: pytest.raises(errors.InvalidRequest, client.detect, b"BUSY"))
            # Once b"BUSY" is on the worker (0.8 s), what follows queues behind it. Polled, not slept:
            # a fixed sleep races the pool's thread on a loaded machine.
            deadline = time.monotonic() + 20
            while _metric(server, "detserve_in_flight", {"model": MODEL}) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            rest = [pool.submit(rest_call, i) for i in range(6)]
            grpc_calls = [pool.submit(grpc_call, i) for i in range(3)]
            assert [f.result() for f in rest] == [200] * 6
            assert [f.result() for f in grpc_calls] == [2] * 3
            busy.result()
    finally:
        for c in clients:
            c.close()
    for door in ("rest", "grpc"):
        after = _metric(server, "detserve_batch_items_total", {**mixed, "protocol": door})
        assert after > before[door], f"no {door} items in a mixed batch"


def test_error_status_codes(server, images):
    channel = grpc.insecure_channel(server.grpc)
    try:
        detect = channel.unary_unary("/detserve.v1.Detector/Detect")
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for method in (detect, infer):
            with pytest.raises(grpc.RpcError) as err:
                method(b"\x0a\xff\xff", timeout=10)  # a truncated field: not protobuf
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        from service.protocols.grpc.generated import detserve_pb2 as pb
        from service.protocols.grpc.generated import grpc_service_pb2 as kpb

        too_big = pb.DetectRequest(model=MODEL, image=pb.Image(encoded=b"x" * (3 * 1024 * 1024)))
        with pytest.raises(grpc.RpcError) as err:
            detect(too_big.SerializeToString(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as err:
            detect(pb.DetectRequest(model=MODEL, image=pb.Image(encoded=b"not an image")).SerializeToString(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            infer(kpb.ModelInferRequest(model_name=MODEL).SerializeToString(), timeout=10)  # missing inputs
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        typed = kpb.ModelInferRequest(model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="image", datatype="INT64", shape=[1], contents=kpb.InferTensorContents(int64_contents=[1]))])
        with pytest.raises(grpc.RpcError) as err:
            infer(typed.SerializeToString(), timeout=10)  # wrong datatype
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            infer(kpb.ModelInferRequest(model_name="nope").SerializeToString(), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()

    v2 = f"{server.http}/v2/models/{MODEL}/infer"
    assert httpx.post(v2, content=b"{broken", timeout=10).status_code == 400
    assert httpx.post(v2, json={"inputs": []}, timeout=10).json()["error"]
    wrong = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [0.5]}]}
    assert httpx.post(v2, json=wrong, timeout=10).status_code == 400
    big = httpx.post(v2, content=b"\0" * (3 * 1024 * 1024), headers={"Inference-Header-Content-Length": "0"}, timeout=10)
    assert big.status_code == 413 and "max_request_size" in big.json()["error"]
    raw = httpx.post(v2, content=images[0].read_bytes(), headers={"Inference-Header-Content-Length": "0"}, timeout=10)
    assert raw.status_code == 200 and raw.json()["outputs"][3]["data"] == [len(_predictions(server, images[0]))]


def test_python_client_rest_and_grpc_agree(server, images):
    data = [p.read_bytes() for p in images]
    with DetserveClient(server.http, model=MODEL, management_url=server.management) as rest, \
            DetserveClient(grpc=server.grpc) as grpc_client:
        assert rest.health() and grpc_client.health()
        for client in (rest, grpc_client):
            models = client.list_models()
            assert [m.name for m in models] == [MODEL] and models[0].classes == CLASSES
            assert client.model_info(MODEL).version == f"{MODEL}-test0001"
        via_rest = rest.detect_batch(data)
        via_grpc = grpc_client.detect_batch(data)
        for a, b in zip(via_rest, via_grpc):
            assert [(d.label, d.class_name) for d in a.detections] == [(d.label, d.class_name) for d in b.detections]
            for da, db in zip(a.detections, b.detections):
                assert da.score == pytest.approx(db.score, abs=1e-5)
                assert da.box_xyxy == pytest.approx(db.box_xyxy, abs=0.01)
        one = grpc_client.detect(data[0], score_thr=0.8, classes=["circle"])
        assert all(d.class_name == "circle" and d.score >= 0.8 for d in one.detections)
        with pytest.raises(errors.InvalidRequest):
            grpc_client.detect(b"junk")
        with pytest.raises(errors.ModelNotFound):
            rest.detect(data[0], model="nope")

    async def async_use():
        async with AsyncDetserveClient(grpc=server.grpc, model=MODEL) as client:
            results = await asyncio.gather(*(client.detect(d) for d in data))
            raw = await client.detect(RawImage(np.zeros((8, 8, 3), np.uint8).tobytes(), 8, 8))
            return results, raw
    results, raw = asyncio.run(async_use())
    assert [len(r.detections) for r in results] == [len(r.detections) for r in via_grpc]
    assert (raw.image_width, raw.image_height) == (8, 8)


def test_predict_remote_mode_over_both_protocols(server, images, capfd):
    from service.cli import main

    lines = {}
    for flag, target in (("--url", server.http), ("--grpc", server.grpc)):
        assert main(["predict", *map(str, images), "--model", MODEL, flag, target]) == 0
        lines[flag] = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert len(lines["--url"]) == len(lines["--grpc"]) == len(images)
    for rest_dets, grpc_dets, path in zip(lines["--url"], lines["--grpc"], images):
        expected = _predictions(server, path)
        assert rest_dets == expected
        # gRPC carries float32 boxes, so a rounded coordinate may differ in its last (0.01) digit.
        assert [(d["class_label"], d["score"]) for d in grpc_dets] == [(d["class_label"], d["score"]) for d in expected]
        for got, want in zip(grpc_dets, expected):
            assert got["bbox"] == pytest.approx(want["bbox"], abs=0.011)
    assert main(["predict", str(images[0]), "--model", "nope", "--grpc", server.grpc]) == 1
    assert "model_not_found" in capfd.readouterr().err


def _shapes_jpeg(path: Path, seed: int) -> Path:
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = (int(v) for v in (rng.integers(40, 280), rng.integers(40, 200), rng.integers(15, 40)))
        color = tuple(int(v) for v in rng.integers(120, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        else:
            draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
    image.save(path, "JPEG", quality=95)
    return path


def _real_models(store: Path) -> dict[str, bool]:
    """The bundled models whose weights are there, plus tiny random-weight stand-ins (no score
    threshold, so they still report boxes and masks) for any that are not. name -> has_masks."""
    torch = pytest.importorskip("torch")
    from fakes import write_model

    from service.detectors.checkpoint import save_checkpoint
    from service.detectors.registry import build_detector

    models = {}
    for name, arch, has_masks in (("rtmdet", "rtmdet-tiny", False), ("rtmdet-ins", "rtmdet-ins-tiny", True)):
        bundled = REPO / "models" / name
        if (bundled / "weights.pth").is_file():
            shutil.copytree(bundled, store / name)
            models[name] = has_masks
            continue
        stand_in = f"random-{name}"
        folder = write_model(store, stand_in, arch=arch, extra='weights = "weights.pth"\ndefault_score_thr = 0.0\n'
                             "[test_cfg]\nscore_thr = 0.0\nmax_per_img = 5")
        torch.manual_seed(0)
        save_checkpoint(folder / "weights.pth", build_detector(arch, 2).state_dict(), ["a", "b"])
        models[stand_in] = has_masks
    return models


@pytest.mark.slow
def test_real_models_through_tritonclient_equal_predictions(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    models = _real_models(store)
    images = [_shapes_jpeg(tmp_path / f"shapes{i}.jpg", i) for i in range(2)]
    srv = Server(store, None, models=list(models))
    try:
        for model, has_masks in models.items():
            expected = _triton_matches_predictions(srv, model, images, has_masks, batch_invariant=False)
            assert any(expected), f"{model} found nothing: the comparison would be vacuous"
    finally:
        srv.stop()
