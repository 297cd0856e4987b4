"""Generated malformed input against every /labelstudio/{model} route: never a 5xx, healthy after.

In-process app over the fake engine, so hundreds of cases run in seconds. Generated URLs use IP
literals or malformed hosts only, so no case waits on DNS.
"""
from __future__ import annotations

import base64
import json
import random

import pytest
from fakes import BlobEngine, png_data_uri
from fastapi.testclient import TestClient

from service.protocols.rest.app import build_inference_app
from service.settings import LabelStudioSettings, ServerSettings

SEED = 15
CASES = 600
RECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Blob" predicted_values="blob"/></RectangleLabels></View>"""
ROUTES = [("GET", "health"), ("GET", ""), ("POST", "setup"), ("POST", "predict"), ("POST", "webhook"),
          ("GET", "versions"), ("POST", "versions"), ("GET", "metrics")]
BAD_URLS = [
    "http://[", "http://[::1", "http://]/", "http://h:99999/a.png", "http://h:-1/", "http://:80/", "http:///x",
    "http://127.0.0.1:1/a.png", "http://0/", "http://[::]/a", "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/x", "http://[fe80::1%25eth0]/x", "http://[::ffff:127.0.0.1]/", "https://127.0.0.1:0/",
    "http://user:pass@127.0.0.1/", "http://\x00/", "http://a b/", "http://\u2603/", "file:///etc/passwd",
    "ftp://10.0.0.1/a", "gopher://127.0.0.1:70/", "javascript:alert(1)", "//127.0.0.1/x", "data:", "data:,",
    "data:;base64,!!!!", "data:image/png;base64,AAAA", "/data/local-files/?d=../../etc/passwd",
    "/data/local-files/?d=%00", "/data/upload/1/a.png", "s3://bucket/../../x", "gs://", "azure-blob://a/b",
    "s3://" + "a" * 5000, "http://10.0.0.1/" + "x" * 20000, "\ud800", " ", "", "?", "#", "\\\\server\\share",
]
CONFIGS = [
    RECT_CONFIG, "", "<", "<View>", "<View/>", "not xml", '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
    "<View>" * 500 + "</View>" * 500, "<View><Image name='i' value='$image'/><RectangleLabels name='l' toName='i' "
    "model_score_threshold='nan'><Label value='Blob'/></RectangleLabels></View>",
    "<View><Image name='i' value='$image'/><PolygonLabels name='p' toName='i,,i'><Label value='blob'/></PolygonLabels></View>",
    "<View><Image name='i' value='$'/><BrushLabels name='b' toName='i'><Label/></BrushLabels></View>",
    RECT_CONFIG.replace("Blob", "\u0000"), "<View>" + "<Label value='x'/>" * 2000 + "</View>",
]


def random_scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 2**70, -(2**70), 1e308, -0.0, 3.5, "", "x", "\u202e\U0001f600", "9" * 500,
        "a" * rng.choice([10, 1000, 70_000]), rng.choice(BAD_URLS), rng.choice(CONFIGS),
    ])


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth > 3 or kind < 0.5:
        return random_scalar(rng)
    if kind < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["tasks", "data", "image", "id", "project", "schema", "label_config", "hostname", "access_token", "action",
            "params", "$undefined$", "extra_params", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def random_task(rng: random.Random):
    if rng.random() < 0.15:
        return random_json(rng)
    data = {"image": rng.choice(BAD_URLS + [random_scalar(rng)])} if rng.random() < 0.9 else random_json(rng)
    task = {"id": rng.choice([1, 2, "7", None, -5, 2**40, True, [1], {"a": 1}, "x" * 300]), "data": data}
    if rng.random() < 0.1:
        task.pop(rng.choice(list(task)))
    return task


def mutated_body(rng: random.Random, route: str):
    """Mostly well-shaped bodies with one or two fields made wrong: reaches deep code paths."""
    if route == "setup":
        body = {"project": "1.1", "schema": RECT_CONFIG, "hostname": "http://127.0.0.1:1", "access_token": "t"}
    elif route == "predict":
        body = {"tasks": [random_task(rng) for _ in range(rng.randint(0, 6))], "project": "1.1",
                "label_config": RECT_CONFIG, "params": {"login": None}}
    else:
        body = {"action": rng.choice(["START_TRAINING", "ANNOTATION_CREATED", "TASKS_CREATED", None, 5, ["x"]]),
                "project": random_json(rng)}
    for _ in range(rng.randint(0, 2)):
        body[rng.choice(list(body) + ["extra"])] = random_json(rng)
    return body


def raw_payload(rng: random.Random, route: str) -> bytes:
    choice = rng.random()
    if choice < 0.6:
        return json.dumps(mutated_body(rng, route)).encode()
    if choice < 0.8:
        return json.dumps(random_json(rng)).encode()
    return rng.choice([
        b"", b"   ", b"{", b"[1,2", b"null", b"\xff\xfe\x00", b'{"tasks": [' * 2000, b"[" * 5000 + b"]" * 5000,
        b'{"tasks": NaN}', b'{"a": 1e999999}', b'"just a string"', b"\x00" * 100, b'{"tasks":[{"data":{"image":"\\ud800"}}]}',
        json.dumps({"tasks": [{"id": i, "data": {"image": "http://[::1"}} for i in range(500)],
                    "label_config": RECT_CONFIG}).encode(),
    ])


@pytest.fixture()
def app_client():
    settings = ServerSettings(
        max_request_size=1024 * 1024,
        labelstudio=LabelStudioSettings(fetch_timeout_s=1.0, max_projects=8, max_tasks=200, max_label_config_bytes=32768),
    )
    engine = BlobEngine()
    with TestClient(build_inference_app(engine, settings), raise_server_exceptions=False) as client:
        yield client, engine


def test_generated_malformed_input_never_gets_a_5xx(app_client):
    client, engine = app_client
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    failures = []
    for case in range(CASES):
        method, route = rng.choice(ROUTES)
        model = "blobs" if rng.random() < 0.9 else rng.choice(["nope", "x" * 300, "%00", "..", "blobs%2f..", "\u00e9"])
        path = f"/labelstudio/{model}/{route}".rstrip("/") + ("/" if not route else "")
        headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])}
        content = raw_payload(rng, route or "health") if method == "POST" or rng.random() < 0.1 else None
        resp = client.request(method, path, content=content, headers=headers)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if resp.status_code >= 500:
            failures.append((case, method, path, (content or b"")[:200], resp.text[:300]))
        elif resp.status_code >= 400:
            assert resp.headers["content-type"].startswith("application/json"), (case, path)
    assert not failures, f"{len(failures)} server errors; first: {failures[:3]}"
    assert sum(statuses.values()) == CASES and statuses.get(200, 0) > 50 and statuses.get(400, 0) > 100, statuses
    # Healthy after: a real prediction still works and nothing is left holding image bytes.
    assert client.get("/labelstudio/blobs/health").status_code == 200
    task = {"id": 1, "data": {"image": png_data_uri(30, 20, (3, 4, 20, 15))}}
    resp = client.post("/labelstudio/blobs/predict", json={"tasks": [task], "label_config": RECT_CONFIG})
    assert resp.status_code == 200 and len(resp.json()["results"][0]["result"]) == 1
    assert client.app.state.labelstudio_backend.image_bytes.used == 0


def test_malformed_basic_auth_headers_are_401_not_500():
    settings = ServerSettings(labelstudio=LabelStudioSettings(basic_auth_user="ls", basic_auth_pass="pw"))
    client = TestClient(build_inference_app(BlobEngine(), settings), raise_server_exceptions=False)
    rng = random.Random(SEED)
    headers = ["Basic", "Basic ", "Basic !!!", "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
               "Basic " + base64.b64encode(b"ls").decode(), "Bearer x", "basic " + base64.b64encode(b"ls:pw ").decode(),
               "Basic " + "A" * 10000, "\u00e9\u00e9".encode(), b"Basic \xe9", b"Basic \xe9\xe9=="]
    headers += ["Basic " + base64.b64encode(bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))).decode()
                for _ in range(100)]
    for value in headers:
        resp = client.get("/labelstudio/blobs/health", headers={"Authorization": value})
        assert resp.status_code == 401, (value[:50], resp.status_code)
    assert client.get("/labelstudio/blobs/health", auth=("ls", "pw")).status_code == 200
