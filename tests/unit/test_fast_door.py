"""The inference app's fast door for /predictions answers exactly as FastAPI's routes do.

Every request below is sent twice to the same app, once through the fast door and once with it
switched off (so through FastAPI's middleware, router and exception handlers), and the two answers
must match: status, body, and the headers a client reads. A scripted engine picks outcomes from the
image bytes; auth, body limits, request ids and metrics are the real ones.
"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fakes import sample
from service import errors
from service.protocols.rest.app import build_inference_app
from service.protocols.rest.torchserve import match_predictions
from service.settings import AuthSettings, ServerSettings
from service.types import BatchSettings, DetectResult, Detection, ModelInfo, WorkerStatus

TOKEN = "fast-door-token"
HEADERS_COMPARED = ("content-type", "content-length", "retry-after", "www-authenticate",
                    "access-control-allow-origin")


class ScriptedEngine:
    """EngineAPI whose outcome is chosen by the image bytes."""

    def __init__(self):
        self.calls = []

    def _info(self, name):
        if name != "shapes":
            raise errors.ModelNotFound(f"model {name!r} is not loaded")
        return ModelInfo("shapes", "shapes-1", "fake", "fake", ("circle", "square"), 64, False, True,
                         BatchSettings(), (WorkerStatus(0, 1, "cpu", "ready"),), max_per_img=100)

    def model_info(self, model):
        return self._info(model)

    def has_model(self, model):
        return model == "shapes"

    def live(self):
        return True

    def ready(self):
        return True

    def model_ready(self, model):
        return model == "shapes"

    def models(self):
        return [self._info("shapes")]

    async def detect(self, model, images, options, *, protocol=None, request_id=None, timeout_s=None):
        self._info(model)
        self.calls.append((model, [i.data for i in images], options, request_id, timeout_s))
        out = []
        for image in images:
            if image.data == b"overload":
                raise errors.Overloaded("queue full", retry_after_s=2.5)
            if image.data == b"boom":
                raise RuntimeError("a bug, not a domain error")
            if image.data == b"slow":
                raise errors.DeadlineExceeded("too slow")
            det = Detection(1, "square", 0.75, (1.0, 2.0, 3.5, 4.25))
            out.append(DetectResult([] if image.data == b"empty" else [det], 64, 48, model, "shapes-1",
                                    rendered=b"\x89PNG-fake" if options.render else None))
        return out


# (method, path, keyword arguments for TestClient.request)
REQUESTS = [
    ("PUT", "/predictions/shapes", dict(content=b"jpeg")),
    ("POST", "/predictions/shapes", dict(content=b"empty")),
    ("PUT", "/predictions/shapes/shapes-1", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes/other", dict(content=b"jpeg")),
    ("PUT", "/predictions/nope", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes?score_thr=0.5&max_dets=3&classes=square", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes?score_thr=7", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes?format=image&image_format=png", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes", dict(content=b"")),
    ("PUT", "/predictions/shapes", dict(content=b"text", headers={"content-type": "text/plain"})),
    ("PUT", "/predictions/shapes", dict(content=b"jpeg", headers={"X-Request-Timeout-Ms": "nan"})),
    ("PUT", "/predictions/shapes", dict(content=b"jpeg", headers={"X-Request-Timeout-Ms": "250"})),
    ("PUT", "/predictions/shapes", dict(content=b"overload")),
    ("PUT", "/predictions/shapes", dict(content=b"slow")),
    ("PUT", "/predictions/shapes", dict(content=b"boom")),
    ("PUT", "/predictions/shapes", dict(content=b"x" * 5000)),
    ("PUT", "/predictions/shapes", dict(chunks=[b"y" * 600] * 3)),  # no Content-Length: cut while streaming
    ("POST", "/predictions/shapes", dict(files={"data": ("a.jpg", b"one", "image/jpeg")})),
    ("POST", "/predictions/shapes", dict(files=[("a", ("a.jpg", b"one")), ("b", ("b.jpg", b"two"))])),
    ("POST", "/predictions/shapes", dict(files={"body": (None, "not base64!")})),
    ("PUT", "/predictions/shapes/", dict(content=b"jpeg")),
    ("PUT", "/predictions/shapes/v/extra", dict(content=b"jpeg")),
    ("GET", "/predictions/shapes", dict()),
]


def answer(client: TestClient, method: str, path: str, kwargs: dict, request_id: str):
    kwargs = dict(kwargs)
    if "chunks" in kwargs:
        kwargs["content"] = iter(kwargs.pop("chunks"))
    headers = {"X-Request-ID": request_id, **kwargs.pop("headers", {})}
    r = client.request(method, path, headers=headers, **kwargs)
    assert r.headers["x-request-id"] == request_id
    return r.status_code, r.content, {h: r.headers.get(h) for h in HEADERS_COMPARED}


def both_ways(app, requests, extra_headers=None):
    engine = app.state.engine
    with TestClient(app, raise_server_exceptions=False) as client:
        fast, slow = [], []
        for i, (method, path, kwargs) in enumerate(requests):
            kwargs = {**kwargs, "headers": {**(extra_headers or {}), **kwargs.get("headers", {})}}
            app.fast_door_enabled = True
            fast.append(answer(client, method, path, kwargs, f"req-{i}"))
            fast_call = engine.calls[-1] if engine.calls else None
            app.fast_door_enabled = False
            slow.append(answer(client, method, path, kwargs, f"req-{i}"))
            assert (engine.calls[-1] if engine.calls else None) == fast_call, (method, path)
    return fast, slow


def test_the_fast_door_answers_every_prediction_request_as_the_fastapi_routes_do():
    app = build_inference_app(ScriptedEngine(), ServerSettings(max_request_size=1000))
    fast, slow = both_ways(app, REQUESTS)
    for (method, path, _), got, want in zip(REQUESTS, fast, slow):
        assert got == want, (method, path)
    statuses = [status for status, _, _ in fast]
    # The trailing slash is FastAPI's both ways: a 307 to the route, which the client follows.
    assert statuses == [200, 200, 200, 404, 404, 200, 400, 200, 400, 415, 400, 200, 429, 504, 500, 413, 413,
                        200, 200, 400, 200, 404, 405]


def test_with_auth_on_the_fast_door_checks_the_same_token():
    settings = ServerSettings(auth=AuthSettings(inference_tokens=[TOKEN], management_tokens=["mgmt-token"]))
    app = build_inference_app(ScriptedEngine(), settings)
    requests = [("PUT", "/predictions/shapes", dict(content=b"jpeg")),
                ("PUT", "/predictions/nope", dict(content=b"jpeg"))]
    for headers, statuses in (({}, [401, 401]), ({"Authorization": "Bearer wrong"}, [401, 401]),
                              ({"Authorization": "Bearer mgmt-token"}, [403, 403]),
                              ({"Authorization": "Basic abc"}, [401, 401]),
                              ({"Authorization": f"Bearer {TOKEN}"}, [200, 404])):
        fast, slow = both_ways(app, requests, headers)
        assert fast == slow, headers
        assert [status for status, _, _ in fast] == statuses, headers


def test_the_fast_door_counts_requests_in_the_same_metrics():
    app = build_inference_app(ScriptedEngine(), ServerSettings())
    labels = {"model": "shapes", "protocol": "rest", "code": "200"}
    unknown = {"model": "_unknown", "protocol": "rest", "code": "404"}
    before, before_unknown = sample("detserve_requests_total", labels), sample("detserve_requests_total", unknown)
    with TestClient(app) as client:
        assert client.put("/predictions/shapes", content=b"jpeg").status_code == 200
        assert client.put("/predictions/nope", content=b"jpeg").status_code == 404
    assert sample("detserve_requests_total", labels) == before + 1
    assert sample("detserve_requests_total", unknown) == before_unknown + 1


def test_predictions_skip_fastapi_only_when_nothing_but_the_request_context_wraps_them():
    app = build_inference_app(ScriptedEngine(), ServerSettings())
    client = TestClient(app)  # no lifespan, as uvicorn runs it (lifespan="off")
    assert client.put("/predictions/shapes", content=b"jpeg").status_code == 200
    assert app.middleware_stack is None  # FastAPI's stack was never needed, so never built
    assert client.get("/ping").status_code == 200
    assert app.middleware_stack is not None
    # CORS runs only in FastAPI's stack: with origins configured, /predictions goes through it.
    origin = "https://labeling.example.com"
    app = build_inference_app(ScriptedEngine(), ServerSettings(cors_origins=[origin]))
    with TestClient(app) as client:
        r = client.put("/predictions/shapes", content=b"jpeg", headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert app.fast_door_enabled is False


@pytest.mark.parametrize("method, path, expected", [
    ("PUT", "/predictions/m", ("m", None)),
    ("POST", "/predictions/m/v1", ("m", "v1")),
    ("PUT", "/predictions/m%20x", ("m%20x", None)),
    ("GET", "/predictions/m", None),
    ("PUT", "/predictions/", None),
    ("PUT", "/predictions//v", None),
    ("PUT", "/predictions/m/", None),
    ("PUT", "/predictions/m/v/", None),
    ("PUT", "/predictionsx/m", None),
    ("PUT", "/v2/models/m/infer", None),
])
def test_match_predictions_takes_what_the_two_routes_take(method, path, expected):
    assert match_predictions(method, path) == expected


def test_each_prediction_writes_one_access_line_either_way(caplog):
    app = build_inference_app(ScriptedEngine(), ServerSettings())
    with TestClient(app) as client, caplog.at_level("INFO", logger="detserve.access"):
        for enabled in (True, False):
            app.fast_door_enabled = enabled
            client.put("/predictions/nope", content=b"jpeg", headers={"X-Request-ID": f"log-{enabled}"})
    lines = [r for r in caplog.records if r.name == "detserve.access"]
    assert [r.getMessage() for r in lines] == ["PUT /predictions/nope 404"] * 2
    assert [(r.status, r.request_id) for r in lines] == [(404, "log-True"), (404, "log-False")]
    assert all(r.ms >= 0 and r.client for r in lines)
