"""The REST adapters in-process, over a small fake EngineAPI: request parsing, error mapping, the
body limit, request ids, auth wiring and the management shapes. No processes, no models.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from service import errors
from service.protocols.rest.app import build_inference_app, build_management_app, build_metrics_app
from service.settings import AuthSettings, ServerSettings
from service.types import BatchSettings, DetectResult, Detection, ModelInfo, RenderFormat, WorkerStatus

pytestmark = pytest.mark.integration

CLASSES = ("circle", "square", "triangle")


class FakeEngine:
    """EngineAPI with scripted outcomes: the image bytes pick the behaviour."""

    def __init__(self):
        self.calls: list[dict] = []
        self.batch = BatchSettings()
        self.workers = 1
        self.loaded = {"shapes"}

    def _info(self, name: str) -> ModelInfo:
        if name not in self.loaded:
            raise errors.ModelNotFound(f"model {name!r} is not loaded")
        workers = tuple(WorkerStatus(i, 1000 + i, "cpu", "ready") for i in range(self.workers))
        return ModelInfo(name, f"{name}-abcdef12", "rtmdet-tiny", "eager", CLASSES, 320, False, True, self.batch,
                         workers, queue_depth=3)

    async def detect(self, model, images, options=None, *, protocol=None, request_id=None, timeout_s=None):
        self._info(model)
        self.calls.append(dict(model=model, images=[i.data for i in images], options=options,
                               request_id=request_id, timeout_s=timeout_s))
        out = []
        for image in images:
            if image.data == b"overload":
                raise errors.Overloaded("queue full", retry_after_s=1.5)
            if image.data == b"boom":
                raise RuntimeError("a bug")
            if image.data.startswith(b"bad"):
                raise errors.InvalidImage("cannot decode image")
            det = Detection(1, "square", 0.9, (1.0, 2.0, 30.5, 40.25))
            out.append(DetectResult([det], 64, 48, model, "v", rendered=b"\x89PNG-fake" if options.render else None))
        return out

    def live(self):
        return True

    def ready(self):
        return self.workers > 0

    def model_ready(self, model):
        return model in self.loaded

    def models(self):
        return [self._info(n) for n in sorted(self.loaded)]

    def model_info(self, model):
        return self._info(model)

    async def load_model(self, name, *, workers=None):
        if name != "other":
            raise errors.ModelNotFound(f"no model {name!r} in model store")
        self.loaded.add(name)
        return self._info(name)

    async def unload_model(self, name):
        self._info(name)
        self.loaded.discard(name)

    async def scale_workers(self, name, count):
        self.workers = count
        return self._info(name)

    async def set_batch_settings(self, name, **changes):
        self.batch = dataclasses.replace(self.batch, **{k: v for k, v in changes.items() if v is not None})
        return self._info(name)


@pytest.fixture()
def engine():
    return FakeEngine()


@pytest.fixture()
def client(engine):
    settings = ServerSettings(max_request_size=1000)
    with TestClient(build_inference_app(engine, settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture()
def mgmt(engine):
    with TestClient(build_management_app(engine, ServerSettings())) as c:
        yield c


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert body["message"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_raw_body_returns_torchserve_list(client, engine):
    r = client.put("/predictions/shapes", content=b"jpegbytes")
    assert r.status_code == 200
    assert r.json() == [{"class_label": 1, "class_name": "square", "bbox": [1.0, 2.0, 30.5, 40.25], "score": 0.9}]
    assert engine.calls[0]["images"] == [b"jpegbytes"]
    assert len(r.headers["x-request-id"]) == 32


def test_request_id_is_echoed(client, engine):
    r = client.post("/predictions/shapes", content=b"img", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert engine.calls[0]["request_id"] == "abc-123"


def test_multipart_data_field_and_several_files(client, engine):
    r = client.post("/predictions/shapes", files={"data": ("a.jpg", b"one", "image/jpeg")})
    assert r.status_code == 200 and len(r.json()) == 1
    r = client.post("/predictions/shapes", files=[("img1", ("a.jpg", b"one")), ("img2", ("b.jpg", b"two"))])
    assert r.status_code == 200
    assert [len(per_image) for per_image in r.json()] == [1, 1]
    assert engine.calls[-1]["images"] == [b"one", b"two"]
    r = client.post("/predictions/shapes", files={"body": (None, "aW1n")})  # base64 text, as the mmdet handler accepts
    assert r.status_code == 200 and engine.calls[-1]["images"] == [b"img"]


def test_query_options_and_timeout_header(client, engine):
    r = client.put("/predictions/shapes?score_thr=0.5&max_dets=3&classes=square,circle", content=b"x",
                   headers={"X-Request-Timeout-Ms": "250"})
    assert r.status_code == 200
    call = engine.calls[-1]
    assert call["options"].score_thr == 0.5 and call["options"].max_dets == 3
    assert call["options"].classes == ("square", "circle")
    assert call["timeout_s"] == pytest.approx(0.25)


@pytest.mark.parametrize("query", ["score_thr=2", "max_dets=0", "classes=dog", "format=pdf", "score_thr=x"])
def test_bad_query_is_400_json(client, query):
    assert_error(client.put(f"/predictions/shapes?{query}", content=b"x"), 400, "invalid_request")


def test_format_image_returns_rendered_bytes(client, engine):
    r = client.put("/predictions/shapes?format=image&image_format=png", content=b"x")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert engine.calls[-1]["options"].render is RenderFormat.PNG


def test_errors_map_through_the_one_table(client):
    assert_error(client.put("/predictions/nope", content=b"x"), 404, "model_not_found")
    assert_error(client.put("/predictions/shapes", content=b""), 400, "invalid_image")
    assert_error(client.put("/predictions/shapes", content=b"bad"), 400, "invalid_image")
    assert_error(client.put("/predictions/shapes", content=b"hello", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")
    for timeout in ("-1", "0", "nan", "1_000", "inf"):
        assert_error(client.put("/predictions/shapes", content=b"x", headers={"X-Request-Timeout-Ms": timeout}),
                     400, "invalid_request")
    assert_error(client.put("/predictions/shapes/other-version", content=b"x"), 404, "model_not_found")
    r = client.put("/predictions/shapes", content=b"overload")
    assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == "2"
    assert_error(client.put("/predictions/shapes", content=b"boom"), 500, "internal")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/predictions/shapes"), 405, "method_not_allowed")


def test_body_over_limit_is_413_declared_or_streamed(client, engine):
    assert_error(client.put("/predictions/shapes", content=b"x" * 1001), 413, "payload_too_large")

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(5):
            yield b"y" * 300

    assert_error(client.put("/predictions/shapes", content=chunks()), 413, "payload_too_large")
    # Under /v2/ the same refusal also speaks the Open Inference Protocol's {"error": ...}.
    for body in (b"x" * 1001, chunks()):
        r = client.post("/v2/models/shapes/infer", content=body)
        assert r.status_code == 413 and "max_request_size" in r.json()["error"]
    assert engine.calls == []


def test_health_routes(client, engine):
    assert client.get("/ping").json() == {"status": "Healthy"}
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready", "models": {"shapes": True}}
    engine.workers = 0
    r = client.get("/ping")
    assert r.status_code == 500 and r.json() == {"status": "Unhealthy"}
    assert client.get("/readyz").status_code == 503


def test_auth_guards_inference_but_not_health(engine):
    settings = ServerSettings(auth=AuthSettings(inference_tokens=["inf-token"], management_tokens=["mgmt-token"]))
    with TestClient(build_inference_app(engine, settings)) as c:
        assert c.get("/ping").status_code == 200
        assert_error(c.put("/predictions/shapes", content=b"x"), 401, "unauthenticated")
        assert_error(c.put("/predictions/shapes", content=b"x", headers={"Authorization": "Bearer mgmt-token"}),
                     403, "permission_denied")
        assert c.put("/predictions/shapes", content=b"x", headers={"Authorization": "Bearer inf-token"}).status_code == 200
        # Optional routers are mounted; KServe health stays open. Label Studio has no Basic auth
        # configured here, so with tokens on it takes the bearer token like the rest (issue 15).
        assert c.get("/v2/health/live").status_code == 200
        assert_error(c.get("/v2/models/shapes"), 401, "unauthenticated")
        assert_error(c.get("/labelstudio/shapes/health"), 401, "unauthenticated")
        assert c.get("/labelstudio/shapes/health", headers={"Authorization": "Bearer inf-token"}).status_code == 200
    with TestClient(build_management_app(engine, settings)) as m:
        assert_error(m.get("/models"), 401, "unauthenticated")
        assert m.get("/models", headers={"Authorization": "Bearer mgmt-token"}).status_code == 200


def test_protect_health_and_metrics_and_cors(engine):
    auth = AuthSettings(inference_tokens=["inf"], management_tokens=["mgmt"], protect_health=True, protect_metrics=True)
    settings = ServerSettings(auth=auth, cors_origins=["https://app.example"])
    with TestClient(build_inference_app(engine, settings)) as c:
        assert_error(c.get("/ping"), 401, "unauthenticated")
        assert c.get("/ping", headers={"Authorization": "Bearer inf"}).status_code == 200
        r = c.options("/predictions/shapes", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "PUT"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
    with TestClient(build_metrics_app(settings)) as m:
        assert_error(m.get("/metrics"), 401, "unauthenticated")
        assert m.get("/metrics", headers={"Authorization": "Bearer mgmt"}).status_code == 200


def test_management_describe_load_scale_batch_unload(mgmt, engine):
    assert mgmt.get("/models").json()["models"][0]["modelName"] == "shapes"
    (desc,) = mgmt.get("/models/shapes").json()
    assert desc["batchSize"] == 8 and desc["jobQueueStatus"]["pendingRequests"] == 3
    assert desc["workers"][0]["status"] == "READY" and desc["classes"] == list(CLASSES)

    assert mgmt.post("/models?url=other.mar").status_code == 200
    assert_error(mgmt.post("/models?model_name=other"), 409, "conflict")  # already loaded, as TorchServe answers
    assert_error(mgmt.post("/models?url=http://evil/x.mar"), 400, "invalid_request")
    assert_error(mgmt.post("/models?model_name=other%0A"), 400, "invalid_request")  # "$" let a final newline in
    for i in range(3):  # unknown names are refused before the scale bookkeeping keeps a counter for them
        assert_error(mgmt.put(f"/models/nope{i}?min_worker=1"), 404, "model_not_found")
    assert not any(name.startswith("nope") for name in getattr(mgmt.app.state, "scale_calls", {}))
    assert_error(mgmt.post("/models?model_name=missing"), 404, "model_not_found")

    r = mgmt.put("/models/shapes?min_worker=3")
    assert r.status_code == 200 and len(r.json()["model"]["workers"]) == 3

    r = mgmt.put("/models/shapes/batch", json={"max_batch_size": 4, "max_batch_delay_ms": 5})
    assert r.json()["model"]["batchSize"] == 4 and r.json()["model"]["maxBatchDelay"] == 5
    assert mgmt.put("/models/shapes/batch?max_queue_size=10").json()["model"]["maxQueueSize"] == 10
    assert_error(mgmt.put("/models/shapes/batch", json={"max_batch_size": 0}), 400, "invalid_request")
    assert_error(mgmt.put("/models/shapes/batch", json={"bogus": 1}), 400, "invalid_request")
    # JSON true is not 1 and null is not a change (pydantic's lax mode took both)
    for value in (True, None):
        r = mgmt.put("/models/shapes/batch", json={"max_batch_size": value})
        assert_error(r, 400, "invalid_request")
        assert r.json()["message"].startswith("max_batch_size: must be a number")

    # TorchServe's versioned routes: the loaded version (or "all"), else 404 like an unknown model
    assert mgmt.get("/models/shapes/shapes-abcdef12").json()[0]["modelName"] == "shapes"
    assert mgmt.get("/models/shapes/all").status_code == 200
    assert_error(mgmt.get("/models/shapes/9.9"), 404, "model_not_found")
    r = mgmt.put("/models/shapes/shapes-abcdef12?min_worker=2")
    assert r.status_code == 200 and len(r.json()["model"]["workers"]) == 2
    assert_error(mgmt.put("/models/shapes/9.9?min_worker=1"), 404, "model_not_found")
    assert_error(mgmt.delete("/models/other/9.9"), 404, "model_not_found")
    assert mgmt.delete("/models/other/other-abcdef12").status_code == 200
    assert mgmt.post("/models?model_name=other").status_code == 200

    assert mgmt.delete("/models/other").status_code == 200
    assert_error(mgmt.delete("/models/other"), 404, "model_not_found")


def test_metrics_app_serves_prometheus_text(client):
    client.put("/predictions/shapes", content=b"x")
    with TestClient(build_metrics_app(ServerSettings())) as m:
        r = m.get("/metrics")
    assert r.status_code == 200
    assert 'detserve_requests_total{code="200",model="shapes",protocol="rest"}' in r.text


def test_front_process_imports_no_torch():
    code = ("import sys, service.server, service.commands.serve, service.protocols.rest.app as a, service.engine.engine; "
            "from service.settings import ServerSettings; "
            "a.build_inference_app(None, ServerSettings()); a.build_management_app(None, ServerSettings()); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_scale_call_overtaken_by_a_later_one_answers_at_once():
    """Scaling to 0 waits for busy workers to retire; a later scale to 1 makes that count
    unreachable, and the first call used to wait out drain_timeout_s + 5 s (35 s) before its 202."""
    import asyncio

    import httpx

    class SlowToShrink(FakeEngine):
        async def scale_workers(self, name, count):
            self._info(name)
            if count:  # growing is immediate; shrinking waits for a batch that never ends here
                self.workers = count
            return self._info(name)

    async def scenario():
        app = build_management_app(SlowToShrink(), ServerSettings())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mgmt") as client:
            first = asyncio.ensure_future(client.put("/models/shapes?min_worker=0"))
            await asyncio.sleep(0.3)
            second = await client.put("/models/shapes?min_worker=1")
            assert second.status_code == 200
            overtaken = await asyncio.wait_for(first, 5)
            assert overtaken.status_code == 202 and overtaken.json()["model"]["minWorkers"] == 1

    asyncio.run(scenario())
