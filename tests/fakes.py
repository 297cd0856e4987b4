"""Shared fakes: a controllable clock and a predictor whose behaviour is chosen per image.

FakePredictor reads each EncodedImage's bytes as a command, so a test can steer one request:
  b"ok..."          -> an empty DetectResult
  b"BAD..."         -> errors.InvalidImage for that image only
  b"SLEEP:<s>"      -> the batch sleeps <s> seconds (the longest request wins)
  b"CRASH"          -> the worker process dies (os._exit) mid-batch
  b"HANG"           -> the batch never returns
  b"RAISE"          -> predict() raises RuntimeError for the whole batch
  b"DIGEST..."      -> model_version = sha256 of all the image's bytes (checks payload transport)
  b"THREADS..."     -> model_version = "threads=<n>": the width the worker last set (set_threads)
With `oom_above=N`, a batch larger than N raises torch.cuda.OutOfMemoryError.
Each result reports `image_width` = size of the batch it ran in and `image_height` = worker pid.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service import errors
from service.types import DetectResult, EncodedImage, RawImage

FAKE_FACTORY = "fakes:FakePredictor.from_config"


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def _resolved(cfg):
    """The cfg a real Predictor keeps: the family's keep-ratio scale filled in (None for square inputs)."""
    if cfg.arch == "null":  # the registry imports torch: seconds a fake worker's start must not pay
        return cfg
    from service.detectors.base import get_detector
    from service.errors import ConfigError

    try:
        scale = get_detector(cfg.arch).keep_ratio_scale(cfg)
    except ConfigError:  # "null" and made-up archs
        return cfg
    return cfg.model_copy(update={"resize_scale": scale})


class FakePredictor:
    seen: list[bytes] = []  # every command run, in this process (inline engines only)

    def __init__(self, cfg, device: str, threads: int | None, oom_above: int | None = None,
                 load_delay_s: float = 0.0, fail_load: bool = False, load_stages: int = 0,
                 record_to: str | None = None, raw_delay_s: float = 0.0):
        if fail_load:
            raise FileNotFoundError("weights.pth: no such file (fake)")
        if not load_stages:
            time.sleep(load_delay_s)
        for stage in range(load_stages):  # as backend auto's export and parity checks report themselves
            from service.backends import auto

            auto._progress(f"fake stage {stage + 1}")
            time.sleep(load_delay_s)
        self.cfg = _resolved(cfg)
        self.name = cfg.name
        self.version = f"{cfg.name}-fake"
        self.arch = cfg.arch
        self.classes = tuple(cfg.classes or ("a", "b"))
        self.has_masks = False
        self.input_size = cfg.input_size
        self.device = "cpu" if device in ("auto", None) else device
        self.backend_name = "fake"
        self.threads = threads
        self.oom_above = oom_above
        self.record_to = record_to  # a file that gets a line per predict call, from any process
        self.raw_delay_s = raw_delay_s  # seconds per RawImage (the warm-up's blank images)
        self.closed = False
        self.threads_now = threads  # what the worker's set_threads last asked for

    def set_threads(self, threads: int) -> None:
        self.threads_now = threads

    @classmethod
    def from_config(cls, cfg, *, device: str | None = None, threads: int | None = None, **kwargs):
        return cls(cfg, device or "auto", threads, **kwargs)

    def predict(self, images, options):
        commands = [bytes(img.data[:16]) if isinstance(img, EncodedImage) else b"ok" for img in images]
        FakePredictor.seen.extend(commands)
        time.sleep(self.raw_delay_s * sum(isinstance(i, RawImage) for i in images))
        if self.record_to:
            with open(self.record_to, "a") as f:
                f.write(" ".join(f"{type(i).__name__}:{getattr(i, 'width', '-')}x{getattr(i, 'height', '-')}"
                                 for i in images) + "\n")
        if self.oom_above is not None and len(images) > self.oom_above:
            import torch

            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        if any(c.startswith(b"CRASH") for c in commands):
            os._exit(3)
        if any(c.startswith(b"HANG") for c in commands):
            time.sleep(3600)
        if any(c.startswith(b"RAISE") for c in commands):
            raise RuntimeError("predictor exploded (fake)")
        sleeps = [float(c.split(b":")[1]) for c in commands if c.startswith(b"SLEEP:")]
        if sleeps:
            time.sleep(max(sleeps))
        out = []
        for command, img in zip(commands, images):
            if command.startswith(b"BAD"):
                out.append(errors.InvalidImage("not an image (fake)"))
            elif command.startswith(b"THREADS"):
                out.append(DetectResult([], image_width=len(images), image_height=os.getpid(),
                                        model_name=self.name, model_version=f"threads={self.threads_now}"))
            elif command.startswith(b"ENV:"):  # an environment variable and the parent, as the worker sees them
                name = command[4:].decode()
                time.sleep(0.05)  # long enough for concurrent requests to reach every worker
                out.append(DetectResult([], image_width=os.getppid(), image_height=os.getpid(), model_name=self.name,
                                        model_version=f"{os.environ.get(name)} torch={'torch' in sys.modules}"))
            elif command.startswith(b"DRAWN:"):  # format=image with an answer of that many bytes
                out.append(DetectResult([], image_width=1, image_height=os.getpid(), model_name=self.name,
                                        model_version=self.version, rendered=b"\xff" * int(command[6:])))
            elif command.startswith(b"DIGEST"):
                out.append(DetectResult([], image_width=len(img.data), image_height=os.getpid(),
                                        model_name=self.name, model_version=hashlib.sha256(img.data).hexdigest()))
            else:
                out.append(DetectResult([], image_width=len(images), image_height=os.getpid(),
                                        model_name=self.name, model_version=self.version))
        return out

    def close(self) -> None:
        self.closed = True


def write_model(store: Path, name: str, *, arch: str = "null", workers: int = 1, batch: dict | None = None,
                extra: str = "") -> Path:
    """A model folder in `store` with a model.toml; arch "null" needs no weights."""
    folder = store / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'arch = "{arch}"', 'classes = ["a", "b"]', "input_size = 64", extra, "[workers]", f"count = {workers}"]
    if batch:
        lines.append("[batch]")
        lines += [f"{k} = {v}" for k, v in batch.items()]
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    return folder


@contextlib.asynccontextmanager
async def running_engine(store: Path, *, inline: bool, factory: str | None = FAKE_FACTORY,
                         factory_kwargs: dict | None = None, **settings):
    """An Engine over `store` (fake predictors unless factory=None), stopped on exit."""
    from service.engine.engine import Engine
    from service.settings import ServerSettings

    engine = Engine(ServerSettings(model_store=store, **settings), inline=inline,
                    predictor_factory=factory, factory_kwargs=factory_kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(5.0)


def sample(name: str, labels: dict) -> float:
    """A Prometheus sample from the detserve registry, 0 when absent."""
    from service.observability.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def image(command: bytes) -> EncodedImage:
    return EncodedImage(command)


class BlobEngine:
    """An in-test EngineAPI for the Label Studio routes: finds the bright pixels of an image and
    returns one 'blob' detection (box + mask) and one 'noise' detection no label maps to.

    Counts calls and the most detections in flight at once; `fail_with` makes detect raise."""

    def __init__(self, has_masks=True, ready=True, fail_with=None, delay_s=0.05):
        from service.types import BatchSettings, ModelInfo

        self.info = ModelInfo(name="blobs", version="blobs-1a2b3c4d", arch="fake", backend="fake",
                              classes=("blob", "noise"), input_size=64, has_masks=has_masks, ready=ready,
                              batch=BatchSettings(), default_score_thr=0.3)
        self.fail_with = fail_with
        self.delay_s = delay_s  # per detect call: long enough for every task of a call to arrive
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.priorities = []
        self.options = []  # the DetectOptions of every detect call

    def live(self):
        return True

    def model_info(self, model):
        if model != self.info.name:
            raise errors.ModelNotFound(f"model '{model}' not found")
        return self.info

    def model_ready(self, model):
        return self.model_info(model).ready

    async def detect(self, model, images, options, *, protocol=None, request_id=None, timeout_s=None, priority=None):
        import asyncio

        self.model_info(model)
        self.calls += 1
        self.priorities.append(priority)
        self.options.append(options)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail_with:
                raise self.fail_with
            return [self._detect(image, options) for image in images]
        finally:
            self.in_flight -= 1

    def _detect(self, image: EncodedImage, options) -> DetectResult:
        import cv2
        import numpy as np
        from pycocotools import mask as mask_utils

        from service.types import Detection, RLEMask

        pixels = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise errors.InvalidImage("cannot decode image")
        mask = (pixels > 128).astype(np.uint8)
        ys, xs = np.nonzero(mask)
        h, w = pixels.shape
        if not len(xs):
            return DetectResult([], image_width=w, image_height=h, model_name="blobs", model_version=self.info.version)
        rle = mask_utils.encode(np.asfortranarray(mask))
        dets = [
            Detection(0, "blob", 0.9, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                      RLEMask(h, w, rle["counts"].decode())),
            Detection(1, "noise", 0.8, (0.0, 0.0, 1.0, 1.0), None),
        ]
        dets = [d for d in dets if options.classes is None or d.class_name in options.classes]
        return DetectResult(dets, image_width=w, image_height=h, model_name="blobs", model_version=self.info.version)


def png_bytes(w: int, h: int, box: tuple[int, int, int, int], pad_to: int = 0) -> bytes:
    """A grey PNG with a white box; `pad_to` appends zero bytes after IEND (decoders ignore them)."""
    import cv2
    import numpy as np

    img = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    data = cv2.imencode(".png", img)[1].tobytes()
    return data + b"\0" * max(0, pad_to - len(data))


def png_data_uri(w: int, h: int, box: tuple[int, int, int, int]) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(w, h, box)).decode()


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict


@contextlib.contextmanager
def recording_server(routes: dict[str, tuple[int, bytes, str]] | None = None):
    """A threaded HTTP server on 127.0.0.1 answering `routes` (path without query -> status, body,
    content type; 404 otherwise). Yields (base_url, seen): every request it received, in order."""
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    routes = routes or {}
    seen: list[SeenRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.append(SeenRequest(self.command, self.path, dict(self.headers.items())))
            status, body, content_type = routes.get(urllib.parse.urlsplit(self.path).path, (404, b"", "text/plain"))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


class FakeLabelStudio:
    """A small Label Studio on 127.0.0.1 with the API a pre-annotation job uses (1.23.2 shapes):
    GET /api/projects/{id}, GET /api/tasks (Data Manager paging, `query` selectedItems, `include`),
    GET/POST /api/predictions, DELETE /api/predictions/{id}, POST /api/projects/{id}/import/predictions,
    GET /data/upload/{file}.

    `down` answers 503 to everything; `down_requests` answers 503 to the next N requests;
    `lose_answers_after` = N: after N predictions, each POST still stores its prediction but answers 503
    (the answer lost on the way, or detserve killed before it recorded it).
    Needs `Authorization: Token <token>`. Counts requests and the most in flight at once."""

    def __init__(self, token: str = "ls-token", label_config: str = "", predictions_as_ids: bool = False,
                 bulk_import: bool = True):
        import threading

        self.token = token
        self.label_config = label_config
        self.predictions_as_ids = predictions_as_ids
        self.bulk_import = bulk_import  # POST /api/projects/{id}/import/predictions; off: 404, as an older LS
        self.page_cap: int | None = None  # TASK_API_PAGE_SIZE_MAX: longer pages are cut to this, silently
        self.ignore_include = False  # every field whatever `include` asks, as a Label Studio without it
        self.task_reads: list[str | None] = []  # the `include` of each task-list read
        self.imports: list[int] = []  # predictions per import request
        self.refuse_predictions_for: set[int] = set()  # tasks whose predictions are refused (400), as deleted ones
        self.tasks: dict[int, dict] = {}
        self.predictions: dict[int, dict] = {}
        self.images: dict[str, bytes] = {}
        self.down = False
        self.down_requests = 0
        self.lose_answers_after: int | None = None
        self.image_503s: dict[str, int] = {}  # file name -> how many more GETs of it answer 503
        self.requests: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.url = ""

    def add_task(self, task_id: int, image: bytes | None, *, data: dict | None = None) -> None:
        name = f"{task_id}.png"
        if image is not None:
            self.images[name] = image
        self.tasks[task_id] = {"id": task_id, "data": data if data is not None else {"image": f"/data/upload/1/{name}"},
                               "project": 1}

    def add_prediction(self, task_id: int, model_version: str, result: list | None = None) -> int:
        pid = next(self._ids)
        self.predictions[pid] = {"id": pid, "task": task_id, "model_version": model_version, "result": result or [],
                                 "score": 0.0}
        return pid

    def predictions_of(self, task_id: int, model_version: str | None = None) -> list[dict]:
        return [p for p in self.predictions.values()
                if p["task"] == task_id and (model_version is None or p["model_version"] == model_version)]

    def _task_json(self, task: dict, include: str | None) -> dict:
        preds = self.predictions_of(task["id"])
        full = {**task, "predictions": [p["id"] for p in preds] if self.predictions_as_ids else preds,
                "total_predictions": len(preds)}
        if include is None or self.ignore_include:
            return full
        return {k: v for k, v in full.items() if k in include.split(",")}  # as 1.23.2: only what was asked

    def handle(self, method: str, path: str, query: dict, body: bytes, headers: dict) -> tuple[int, object]:
        import json as _json

        with self._lock:
            self.requests.append((method, path))
            if self.down:
                return 503, {"detail": "down"}
            if self.down_requests > 0:
                self.down_requests -= 1
                return 503, {"detail": "down"}
        if path.startswith("/data/upload/"):
            if headers.get("Authorization") != f"Token {self.token}":
                return 401, {"detail": "no token"}
            name = path.rsplit("/", 1)[-1]
            with self._lock:
                if self.image_503s.get(name, 0) > 0:
                    self.image_503s[name] -= 1
                    return 503, {"detail": "storage busy"}
            data = self.images.get(name)
            return (200, data) if data is not None else (404, {"detail": "no such file"})
        if headers.get("Authorization") != f"Token {self.token}":
            return 401, {"detail": "Authentication credentials were not provided."}
        if method == "GET" and path.startswith("/api/projects/"):
            return 200, {"id": int(path.rstrip("/").rsplit("/", 1)[-1]), "label_config": self.label_config}
        if method == "GET" and path in ("/api/tasks", "/api/tasks/"):
            page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
            size = min(size, self.page_cap or size)
            ids = sorted(self.tasks)
            spec = _json.loads(query["query"]) if "query" in query else {}
            selected = spec.get("selectedItems", {"all": True})
            if not selected.get("all", True):
                ids = [i for i in ids if i in set(selected.get("included", []))]
            chunk = ids[(page - 1) * size: page * size]
            if page > 1 and not chunk:
                return 404, {"detail": "Invalid page."}
            with self._lock:
                self.task_reads.append(query.get("include"))
                tasks = [self._task_json(self.tasks[i], query.get("include")) for i in chunk]
            return 200, {"tasks": tasks, "total": len(ids), "total_annotations": 0, "total_predictions": 0}
        if method == "GET" and path in ("/api/predictions", "/api/predictions/"):
            return 200, self.predictions_of(int(query["task"]))
        if method == "POST" and path in ("/api/predictions", "/api/predictions/"):
            payload = _json.loads(body)
            with self._lock:
                if payload.get("task") not in self.tasks or payload.get("task") in self.refuse_predictions_for:
                    return 400, {"task": ["Invalid pk"]}
                pid = next(self._ids)
                self.predictions[pid] = {"id": pid, **payload}
                if self.lose_answers_after is not None:
                    if self.lose_answers_after <= 0:
                        return 503, {"detail": "gateway timeout"}
                    self.lose_answers_after -= 1
            return 201, self.predictions[pid]
        if method == "POST" and path.startswith("/api/projects/") and path.endswith("/import/predictions"):
            if not self.bulk_import:
                return 404, {"detail": "Not found."}
            items = _json.loads(body)
            with self._lock:
                if any(item.get("task") not in self.tasks or item.get("task") in self.refuse_predictions_for
                       for item in items):  # all or nothing, as 1.23.2
                    return 400, ["contains invalid \"task\" field"]
                for item in items:
                    pid = next(self._ids)
                    self.predictions[pid] = {"id": pid, **item}
                self.imports.append(len(items))
                if self.lose_answers_after is not None:
                    if self.lose_answers_after <= 0:
                        return 503, {"detail": "gateway timeout"}
                    self.lose_answers_after -= len(items)
            return 201, {"created": len(items)}
        if method == "DELETE" and path.startswith("/api/predictions/"):
            with self._lock:
                gone = self.predictions.pop(int(path.rstrip("/").rsplit("/", 1)[-1]), None)
            return (204, None) if gone else (404, {"detail": "Not found."})
        return 404, {"detail": "Not found."}


@contextlib.contextmanager
def fake_label_studio(ls: FakeLabelStudio):
    """Serve `ls` on 127.0.0.1 (threaded) and set `ls.url` for the duration."""
    import json as _json
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parts.query))
            with ls._lock:
                ls.in_flight += 1
                ls.max_in_flight = max(ls.max_in_flight, ls.in_flight)
            try:
                status, payload = ls.handle(self.command, parts.path, query, body, dict(self.headers.items()))
            finally:
                with ls._lock:
                    ls.in_flight -= 1
            raw = payload if isinstance(payload, bytes) else b"" if payload is None else _json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "image/png" if isinstance(payload, bytes) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_DELETE = _answer

    class Server(ThreadingHTTPServer):
        # A job opens ~20 connections at once; the default backlog of 5 drops SYNs, and the
        # kernel's retransmits then look like a Label Studio that takes seconds to answer.
        request_queue_size = 256
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ls.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield ls
    finally:
        server.shutdown()
        server.server_close()
