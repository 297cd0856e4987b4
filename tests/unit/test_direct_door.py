"""The direct door (rest/direct.py) answers /predictions on a real uvicorn server exactly as the
FastAPI routes do, and keeps HTTP/1.1's connection rules: keep-alive, pipelining, Expect:
100-continue, HTTP/1.0, chunked bodies, a client that hangs up, the drain.

The server is the production one (`server._Uvicorn.server`: the bounded httptools protocol with
the door) on loopback in a thread, in front of test_fast_door's scripted engine. Each request is
sent twice, with the door on and with the app's fast doors off (so through FastAPI's middleware,
router and exception handlers), and the answers must match.
"""
from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time

import httpx
import pytest

from service.protocols.rest import direct
from service.protocols.rest.app import build_inference_app
from service.server import _Uvicorn, bind
from service.settings import AuthSettings, ServerSettings
from test_fast_door import REQUESTS, TOKEN, ScriptedEngine
from test_fast_door import HEADERS_COMPARED as FAST_DOOR_HEADERS

HEADERS_COMPARED = (*FAST_DOOR_HEADERS, "inference-header-content-length")

pytestmark = pytest.mark.integration


class SlowEngine(ScriptedEngine):
    """Answers b"wait" only when released, so a test can hold a request mid-flight."""

    def __init__(self):
        super().__init__()
        self.release = None
        self.loop = None
        self.started = threading.Event()

    async def detect(self, model, images, options, **kwargs):
        if images and images[0].data == b"wait":
            self.release, self.loop = asyncio.Event(), asyncio.get_running_loop()
            self.started.set()
            await self.release.wait()
        return await super().detect(model, images, options, **kwargs)


class Served:
    """A real uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.listener = bind("inference", "127.0.0.1", 0)
        self.server = _Uvicorn.server(app, settings)
        self.url = f"http://127.0.0.1:{self.listener.port}"
        self.runs = 0
        door = self.server.config.http
        original = door.direct.run

        async def counted(cycle, route):
            self.runs += 1
            await original(cycle, route)

        door.direct.run = counted
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listener.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.listener.port), timeout=10)


def _answer(client: httpx.Client, method, path, kwargs, request_id):
    kwargs = dict(kwargs)
    if "chunks" in kwargs:
        kwargs["content"] = iter(kwargs.pop("chunks"))
    headers = {"X-Request-ID": request_id, **kwargs.pop("headers", {})}
    r = client.request(method, path, headers=headers, follow_redirects=True, **kwargs)
    assert r.headers["x-request-id"] == request_id
    return r.status_code, r.content, {h: r.headers.get(h) for h in HEADERS_COMPARED}


def _both_ways(served: Served, requests, extra_headers=None):
    app = served.app
    fast, slow, direct_runs = [], [], []
    with httpx.Client(base_url=served.url, timeout=10) as client:
        for i, (method, path, kwargs) in enumerate(requests):
            kwargs = {**kwargs, "headers": {**(extra_headers or {}), **kwargs.get("headers", {})}}
            app.fast_door_enabled = True
            before = served.runs
            fast.append(_answer(client, method, path, kwargs, f"req-{i}"))
            direct_runs.append(served.runs - before)
            app.fast_door_enabled = False
            slow.append(_answer(client, method, path, kwargs, f"req-{i}"))
            assert served.runs - before == direct_runs[-1], "the door must not run with the fast doors off"
    app.fast_door_enabled = True
    return fast, slow, direct_runs


def _read_responses(sock: socket.socket, count: int, timeout_s: float = 10) -> list[tuple[int, dict, bytes]]:
    """`count` HTTP responses (status, lower-cased headers, body) read off one connection."""
    sock.settimeout(timeout_s)
    buffer, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers.get(b"content-length", b"0"))
        while len(buffer) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        out.append((status, headers, buffer[:length]))
        buffer = buffer[length:]
    return out


def _identical_both_ways(requests):
    """The answers through the door, after checking each equals FastAPI's, and the door's runs."""
    settings = ServerSettings(max_request_size=1000)
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served:
        fast, slow, runs = _both_ways(served, requests)
    for (method, path, _), got, want in zip(requests, fast, slow):
        assert got == want, (method, path)
    return fast, runs


def test_the_direct_door_answers_every_prediction_request_as_the_fastapi_routes_do():
    fast, runs = _identical_both_ways(REQUESTS)
    assert [status for status, _, _ in fast] == [200, 200, 200, 404, 404, 200, 400, 200, 400, 415, 400, 200, 429, 504,
                                                  500, 413, 413, 200, 200, 400, 200, 404, 405]
    # Every raw-body prediction took the door; multipart bodies and the other routes went to ASGI,
    # except the trailing slash's redirect, which the client followed to the door.
    assert runs == [1] * 17 + [0, 0, 0, 1, 0, 0]


def _v2(body: dict) -> bytes:
    return json.dumps(body).encode()


_IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(b"jpeg").decode()]}
RAW = {"Inference-Header-Content-Length": "0"}
V2_REQUESTS = [
    ("POST", "/v2/models/shapes/infer", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/versions/shapes-1/infer", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/versions/other/infer", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/nope/infer", dict(content=b"jpeg", headers=RAW)),
    # On the unversioned route FastAPI binds `version` from the query string (the last one given).
    ("POST", "/v2/models/shapes/infer?version=other", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/infer?version=shapes-1&version=n+x", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/infer?version=shapes-1", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/infer", dict(content=_v2({"id": "r1", "inputs": [_IMAGE]}))),
    ("POST", "/v2/models/shapes/infer", dict(content=_v2({"inputs": [_IMAGE],
                                                          "parameters": {"binary_data_output": True}}))),
    ("POST", "/v2/models/shapes/infer", dict(content=_v2({"inputs": [_IMAGE], "outputs": [{"name": "nope"}]}))),
    ("POST", "/v2/models/shapes/infer", dict(content=b"{not json")),
    ("POST", "/v2/models/shapes/infer", dict(content=b"{}", headers={"Inference-Header-Content-Length": "99"})),
    ("POST", "/v2/models/shapes/infer", dict(content=b"overload", headers=RAW)),
    ("POST", "/v2/models/shapes/infer", dict(content=b"slow", headers=RAW)),
    ("POST", "/v2/models/shapes/infer", dict(content=b"boom", headers=RAW)),
    ("POST", "/v2/models/shapes/infer", dict(content=b"x" * 5000, headers=RAW)),
    ("POST", "/v2/models/shapes/infer", dict(chunks=[b"y" * 600] * 3, headers=RAW)),
    ("POST", "/v2/models/shapes/infer/", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models//infer", dict(content=b"jpeg", headers=RAW)),
    ("POST", "/v2/models/shapes/versions/infer", dict(content=b"jpeg", headers=RAW)),
    ("GET", "/v2/models/shapes/infer", dict()),
]


def test_the_direct_door_answers_kserve_v2_infer_as_the_fastapi_route_does():
    fast, runs = _identical_both_ways(V2_REQUESTS)
    # The trailing slash is FastAPI's redirect, which the client follows to the door.
    assert [status for status, _, _ in fast] == [200, 200, 404, 404, 404, 404, 200, 200, 200, 400, 400, 400, 429,
                                                  504, 500, 413, 413, 200, 404, 405, 405]
    assert all(json.loads(body)["error"] for status, body, _ in fast if status >= 400 and body)
    assert fast[8][2]["inference-header-content-length"] is not None  # the binary output's framing
    assert runs == [1] * 18 + [0] * 3


def test_with_auth_on_the_direct_door_checks_the_same_token():
    settings = ServerSettings(auth=AuthSettings(inference_tokens=[TOKEN], management_tokens=["mgmt-token"]))
    requests = [("PUT", "/predictions/shapes", dict(content=b"jpeg")),
                ("PUT", "/predictions/nope", dict(content=b"jpeg")),
                ("POST", "/v2/models/shapes/infer", dict(content=b"jpeg", headers=RAW))]
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served:
        for headers, statuses in (({}, [401, 401, 401]), ({"Authorization": "Bearer wrong"}, [401, 401, 401]),
                                  ({"Authorization": "Bearer mgmt-token"}, [403, 403, 403]),
                                  ({"Authorization": "Basic abc"}, [401, 401, 401]),
                                  ({"Authorization": f"Bearer {TOKEN}"}, [200, 404, 200])):
            fast, slow, runs = _both_ways(served, requests, headers)
            assert fast == slow, headers
            assert [status for status, _, _ in fast] == statuses, headers
            assert runs == [1, 1, 1]


def _access_clients(caplog) -> list[str]:
    return [r.client for r in caplog.records if r.name == "detserve.access"]


def test_proxy_headers_from_a_trusted_proxy_and_cors_leave_the_request_to_asgi(caplog):
    forwarded = {"X-Forwarded-For": "10.1.2.3"}
    settings = ServerSettings()
    # uvicorn trusts 127.0.0.1 by default: its middleware rewrites the client, so ASGI answers.
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served, \
            caplog.at_level("INFO", logger="detserve.access"):
        r = httpx.put(f"{served.url}/predictions/shapes", content=b"jpeg", headers=forwarded)
        assert r.status_code == 200 and served.runs == 0
    assert _access_clients(caplog)[-1].startswith("10.1.2.3:")
    # From a client that is not a trusted proxy the header means nothing on either path: the door answers.
    served = Served(build_inference_app(ScriptedEngine(), settings), settings)
    served.server.config.forwarded_allow_ips = "10.9.9.9"
    with served, caplog.at_level("INFO", logger="detserve.access"):
        r = httpx.put(f"{served.url}/predictions/shapes", content=b"jpeg", headers=forwarded)
        assert r.status_code == 200 and served.runs == 1
    assert _access_clients(caplog)[-1].startswith("127.0.0.1:")
    origin = "https://labeling.example.com"
    settings = ServerSettings(cors_origins=[origin])
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served:
        r = httpx.put(f"{served.url}/predictions/shapes", content=b"jpeg", headers={"Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert served.runs == 0


def test_keep_alive_pipelining_http10_and_expect_100_continue():
    settings = ServerSettings()
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served:
        sock = served.connect()
        # Three pipelined requests in one write: answered in order on the same connection.
        sock.sendall(b"".join(
            b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nX-Request-ID: p%d\r\nContent-Length: 4\r\n\r\njpeg" % i
            for i in range(3)))
        answers = _read_responses(sock, 3)
        assert [(s, h[b"x-request-id"]) for s, h, _ in answers] == [(200, b"p0"), (200, b"p1"), (200, b"p2")]
        assert all(b"connection" not in h for _, h, _ in answers)
        # Expect: 100-continue gets its interim answer before the body is sent.
        sock.sendall(b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"jpeg")
        [(status, _, body)] = _read_responses(sock, 1)
        assert status == 200 and b"square" in body
        # Connection: close, and HTTP/1.0 without keep-alive: the answer says so and the server closes.
        for request in (b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
                        b"PUT /predictions/shapes HTTP/1.0\r\n"):
            sock.sendall(request + b"Content-Length: 4\r\n\r\njpeg")
            [(status, headers, _)] = _read_responses(sock, 1)
            assert status == 200 and headers[b"connection"] == b"close"
            assert sock.recv(10) == b""
            sock.close()
            sock = served.connect()
        # A chunked body, sent in pieces.
        sock.sendall(b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\njp\r\n")
        time.sleep(0.05)
        sock.sendall(b"2\r\neg\r\n0\r\n\r\n")
        [(status, _, body)] = _read_responses(sock, 1)
        assert status == 200 and b"square" in body
        sock.close()
        assert served.runs == 7
    assert served.app.state.engine.calls[-1][1] == [b"jpeg"]


def test_a_client_that_hangs_up_mid_body_or_mid_request_leaves_the_server_serving(caplog):
    settings = ServerSettings()
    engine = SlowEngine()
    with Served(build_inference_app(engine, settings), settings) as served, \
            caplog.at_level("INFO", logger="detserve.access"):
        sock = served.connect()
        sock.sendall(b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone\r\nContent-Length: 100\r\n\r\nabc")
        time.sleep(0.1)
        sock.close()
        # Hung up while the engine runs the request: nothing is written, nothing breaks.
        sock = served.connect()
        sock.sendall(b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nX-Request-ID: left\r\nContent-Length: 4\r\n\r\nwait")
        assert engine.started.wait(10)
        sock.close()
        time.sleep(0.1)
        engine.loop.call_soon_threadsafe(engine.release.set)
        deadline = time.monotonic() + 10
        while served.server.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.put(f"{served.url}/predictions/shapes", content=b"jpeg", timeout=10)
        assert r.status_code == 200
    lines = {r.request_id: r.status for r in caplog.records if r.name == "detserve.access"}
    assert lines["gone"] == 499
    assert lines["left"] == 200  # answered to a closed socket: the write is skipped, the log says what ran


def test_the_drain_answers_a_request_still_running_with_json_503_and_starts_nothing_behind_it():
    settings = ServerSettings(drain_timeout_s=1.0)
    engine = SlowEngine()
    with Served(build_inference_app(engine, settings), settings) as served:
        sock = served.connect()
        # A second request pipelined behind the one that is still running when the drain ends.
        sock.sendall(b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nX-Request-ID: late\r\nContent-Length: 4\r\n\r\nwait"
                     b"PUT /predictions/shapes HTTP/1.1\r\nHost: x\r\nX-Request-ID: queued\r\nContent-Length: 4\r\n\r\njpeg")
        assert engine.started.wait(10)
        served.server.should_exit = True  # uvicorn waits timeout_graceful_shutdown, then cancels the task
        answers = _read_responses(sock, 2, timeout_s=20)
        sock.close()
    [(status, headers, body)] = answers  # then the connection closed: the queued request never ran
    assert status == 503 and headers[b"x-request-id"] == b"late" and headers[b"connection"] == b"close"
    assert b'"code":"model_not_ready"' in body
    assert engine.calls == []


def test_each_prediction_through_the_door_writes_one_access_line(caplog):
    settings = ServerSettings()
    with Served(build_inference_app(ScriptedEngine(), settings), settings) as served, \
            caplog.at_level("INFO", logger="detserve.access"):
        httpx.put(f"{served.url}/predictions/nope", content=b"jpeg", headers={"X-Request-ID": "log-1"})
        assert served.runs == 1
    lines = [r for r in caplog.records if r.name == "detserve.access"]
    assert [r.getMessage() for r in lines] == ["PUT /predictions/nope 404"]
    assert lines[0].request_id == "log-1" and lines[0].client.startswith("127.0.0.1:") and lines[0].ms >= 0


def test_the_door_is_a_plain_protocol_hook():
    # The door is installed on the inference listener only: management and metrics apps have none.
    from service.protocols.rest.app import build_management_app

    settings = ServerSettings()
    inference = _Uvicorn.server(build_inference_app(ScriptedEngine(), settings), settings)
    management = _Uvicorn.server(build_management_app(ScriptedEngine(), settings), settings)
    assert isinstance(inference.config.http.direct, direct.DirectDoor)
    assert management.config.http.direct is None


@pytest.mark.parametrize("method, path, expected", [
    ("POST", "/v2/models/m/infer", ("m", None)),
    ("POST", "/v2/models/m/versions/2/infer", ("m", "2")),
    ("GET", "/v2/models/m/infer", None),
    ("POST", "/v2/models//infer", None),
    ("POST", "/v2/models/infer", None),
    ("POST", "/v2/models/m/versions/infer", None),
    ("POST", "/v2/models/m/versions//infer", None),
    ("POST", "/v2/models/m/x/2/infer", None),
    ("POST", "/v2/models/m/infer/", None),
    ("POST", "/v2/models/m/ready", None),
])
def test_match_infer_takes_what_the_two_v2_routes_take(method, path, expected):
    from service.protocols.rest.kserve_v2 import match_infer

    assert match_infer(method, path) == expected
