"""The /labelstudio/{model} routes on the real inference app, over a small in-test engine."""
from __future__ import annotations

import base64

import pytest
from fakes import BlobEngine, png_bytes, png_data_uri, recording_server, sample
from fastapi.testclient import TestClient

from service.errors import Overloaded
from service.protocols.labelstudio.brush import brush_rle_to_mask
from service.protocols.rest.app import build_inference_app
from service.settings import AuthSettings, LabelStudioSettings, ServerSettings

RECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Blob" predicted_values="blob"/></RectangleLabels></View>"""
BRUSH_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="blob"/></BrushLabels></View>"""


def client_for(engine, **settings) -> TestClient:
    return TestClient(build_inference_app(engine, ServerSettings(**settings)))


def ls_settings(**fields) -> LabelStudioSettings:
    return LabelStudioSettings(**fields)


@pytest.fixture(autouse=True)
def no_ls_env(monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                 "LOCAL_FILES_DOCUMENT_ROOT", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)


def predict_body(tasks, config=RECT_CONFIG):
    return {"tasks": tasks, "project": "1.1795314759", "label_config": config,
            "params": {"login": None, "password": None, "context": None}}


def test_health_setup_versions_metrics_webhook():
    client = client_for(BlobEngine())
    health = client.get("/labelstudio/blobs/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    setup = client.post("/labelstudio/blobs/setup", json={
        "project": "1.1795314759", "schema": RECT_CONFIG, "hostname": "http://localhost:8089",
        "access_token": "abc", "extra_params": None})
    assert setup.status_code == 200 and setup.json() == {"model_version": "blobs-1a2b3c4d"}
    assert client.get("/labelstudio/blobs/versions").json() == {"versions": ["blobs-1a2b3c4d"]}
    assert client.get("/labelstudio/blobs/metrics").json() == {}
    other = client.post("/labelstudio/blobs/webhook", json={"action": "TASKS_CREATED", "tasks": [], "project": {}})
    assert (other.status_code, other.json()) == (200, {"status": "Unknown event"})
    train = client.post("/labelstudio/blobs/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert train.status_code == 201 and train.json()["status"] == "ok"


def test_unknown_model_not_ready_and_unusable_config():
    client = client_for(BlobEngine())
    assert client.get("/labelstudio/nope/health").status_code == 404
    assert client.post("/labelstudio/nope/predict", json=predict_body([])).status_code == 404
    assert client_for(BlobEngine(ready=False)).get("/labelstudio/blobs/health").status_code == 503
    bad = client.post("/labelstudio/blobs/setup", json={"project": "1.1", "schema": "<View><Image name='i' value='$x'/></View>"})
    assert bad.status_code == 400 and "BrushLabels" in bad.json()["message"]
    boxes_only = client_for(BlobEngine(has_masks=False)).post("/labelstudio/blobs/predict",
                                                              json=predict_body([], BRUSH_CONFIG))
    assert boxes_only.status_code == 400 and "predicts boxes only" in boxes_only.json()["message"]
    assert client.post("/labelstudio/blobs/predict", content=b"{not json").status_code == 400
    assert client.post("/labelstudio/blobs/predict", json={"tasks": "x", "label_config": RECT_CONFIG}).status_code == 400


def test_predict_boxes_one_item_per_task_in_order_and_batched_together():
    engine = BlobEngine()
    boxes = [(10 + i, 5, 40 + 2 * i, 30) for i in range(12)]
    tasks = [{"id": i + 1, "data": {"image": png_data_uri(80, 50, box)}} for i, box in enumerate(boxes)]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == len(tasks)
    assert engine.max_in_flight == len(tasks)  # all tasks reached the engine together
    for box, item in zip(boxes, results):
        assert item["model_version"] == "blobs-1a2b3c4d" and item["score"] == 0.9
        (region,) = item["result"]  # 'noise' has no label: dropped
        assert region["type"] == "rectanglelabels" and region["value"]["rectanglelabels"] == ["Blob"]
        assert (region["original_width"], region["original_height"], region["image_rotation"]) == (80, 50, 0)
        v = region["value"]
        back = (v["x"] * 0.8, v["y"] * 0.5, (v["x"] + v["width"]) * 0.8, (v["y"] + v["height"]) * 0.5)
        assert back == pytest.approx(box)


def test_predict_brush_masks_and_config_from_setup():
    client = client_for(BlobEngine())
    client.post("/labelstudio/blobs/setup", json={"project": "7.1", "schema": BRUSH_CONFIG})
    task = {"id": 3, "data": {"image": png_data_uri(40, 30, (5, 6, 25, 20))}}
    resp = client.post("/labelstudio/blobs/predict", json={"tasks": [task], "project": "7.1"})  # no label_config
    (region,) = resp.json()["results"][0]["result"]
    assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
    mask = brush_rle_to_mask(region["value"]["rle"], 30, 40)
    assert (mask > 0).sum() == 20 * 14 and mask[6:20, 5:25].all()


def test_unfetchable_task_gets_empty_result_others_predicted(tmp_path, monkeypatch, caplog):
    (tmp_path / "ok.png").write_bytes(base64.b64decode(png_data_uri(20, 20, (2, 2, 10, 10)).split(",")[1]))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=ok.png"}},
        {"id": 2, "data": {"image": "/data/upload/1/missing.png"}},  # no LABEL_STUDIO_URL
        {"id": 3, "data": {"image": "data:image/png;base64,bm90IGFuIGltYWdl"}},  # not an image
        {"id": 4, "data": {"other": "x"}},
        {"id": 5, "data": {"image": "http://127.0.0.1:9/down.png"}},
    ]
    resp = client_for(BlobEngine()).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results[0]["result"]) == 1
    assert [r["result"] for r in results[1:]] == [[], [], [], []]
    assert all(r["model_version"] == "blobs-1a2b3c4d" for r in results)
    logged = caplog.text
    assert "task 2" in logged and "LABEL_STUDIO_URL is not set" in logged
    assert "task 3" in logged and "task 4" in logged and "task 5" in logged


def test_engine_trouble_fails_the_call_instead_of_storing_empty_predictions():
    engine = BlobEngine(fail_with=Overloaded("queue full", retry_after_s=2))
    tasks = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "2"


def test_basic_auth_from_settings_or_env(monkeypatch):
    client = client_for(BlobEngine(), labelstudio=LabelStudioSettings(basic_auth_user="ls", basic_auth_pass="pw"))
    denied = client.get("/labelstudio/blobs/health")
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/labelstudio/blobs/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/labelstudio/blobs/health", auth=("ls", "pw")).status_code == 200
    monkeypatch.setenv("BASIC_AUTH_USER", "envuser")
    monkeypatch.setenv("BASIC_AUTH_PASS", "envpass")
    env_client = client_for(BlobEngine())
    assert env_client.get("/labelstudio/blobs/health").status_code == 401
    assert env_client.get("/labelstudio/blobs/health", auth=("envuser", "envpass")).status_code == 200


# ---- credentials go only to the configured Label Studio URL -------------------------------------

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
PAT_KEY = (base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=") + "."
           + base64.urlsafe_b64encode(b'{"token_type":"refresh"}').decode().rstrip("=") + ".c2ln")


@pytest.mark.parametrize("key", [LEGACY_KEY, PAT_KEY])
def test_setup_hostname_never_receives_the_configured_key(monkeypatch, key):
    """Issue 15 #1: an unauthenticated /setup named the host that then got LABEL_STUDIO_API_KEY."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", key)
    with recording_server() as (evil, seen):
        for settings in ({}, {"labelstudio": ls_settings(allow_setup_hostname=True, fetch_allow=["127.0.0.1"])}):
            client = client_for(BlobEngine(), **settings)
            client.post("/labelstudio/blobs/setup", json={"project": "9.1", "schema": RECT_CONFIG, "hostname": evil})
            tasks = [{"id": 1, "data": {"image": "/data/upload/9/a.png"}}, {"id": 2, "data": {"image": "s3://b/a.png"}}]
            resp = client.post("/labelstudio/blobs/predict", json={"tasks": tasks, "project": "9.1"})
            assert resp.status_code == 200 and [r["result"] for r in resp.json()["results"]] == [[], []]
    # Not opted in: the hostname is ignored. Opted in: it is asked, but with no key and no PAT exchange.
    assert seen and all(r.method == "GET" and "Authorization" not in r.headers for r in seen)


def test_setup_hostname_gets_only_its_own_token_when_allowed():
    image = png_bytes(20, 20, (2, 2, 10, 10))
    with recording_server({"/data/upload/9/a.png": (200, image, "image/png")}) as (ls, seen):
        client = client_for(BlobEngine(), labelstudio=ls_settings(allow_setup_hostname=True, fetch_allow=["127.0.0.1/32"]))
        client.post("/labelstudio/blobs/setup", json={"project": "9.1", "schema": RECT_CONFIG, "hostname": ls,
                                                      "access_token": "setup-token"})
        resp = client.post("/labelstudio/blobs/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/9/a.png"}}],
                                                                "project": "9.1"})
    assert len(resp.json()["results"][0]["result"]) == 1
    assert [r.headers.get("Authorization") for r in seen] == ["Token setup-token"]


def test_fetch_config_credentials(monkeypatch, tmp_path):
    from service.protocols.labelstudio.backend import ProjectSetup, fetch_config

    setup = ProjectSetup(label_config=None, hostname="http://evil.example", access_token="from-setup")
    assert (fetch_config(ServerSettings(), setup).url, fetch_config(ServerSettings(), setup).api_key) == (None, None)
    opted = fetch_config(ServerSettings(labelstudio=ls_settings(allow_setup_hostname=True, api_key="conf")), setup)
    assert (opted.url, opted.api_key, opted.url_trusted) == ("http://evil.example", "from-setup", False)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls-env:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "env-key")
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path))
    env = fetch_config(ServerSettings(labelstudio=ls_settings(allow_setup_hostname=True)), setup)
    assert (env.url, env.api_key, env.document_root, env.url_trusted) == ("http://ls-env:8080", "env-key", tmp_path, True)
    configured = fetch_config(ServerSettings(labelstudio=ls_settings(url="http://ls-conf", api_key="conf")), setup)
    assert (configured.url, configured.api_key) == ("http://ls-conf", "conf")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    # No key configured: the /setup caller's own token, but only ever to the configured URL.
    assert fetch_config(ServerSettings(), setup).api_key == "from-setup"


# ---- outbound fetch policy ---------------------------------------------------------------------

def test_task_urls_to_the_management_port_and_private_ranges_are_refused(caplog):
    with recording_server({"/models": (200, b'{"models": []}', "application/json")}) as (mgmt, seen):
        port = int(mgmt.rsplit(":", 1)[1])
        client = client_for(BlobEngine(), management_port=port)
        tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(
            [f"{mgmt}/models", f"http://localhost:{port}/models", "http://169.254.169.254/latest/meta-data/",
             "http://10.0.0.1/a.png", "http://[::1]/a.png"])]
        resp = client.post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200 and all(r["result"] == [] for r in resp.json()["results"])
    assert seen == [] and caplog.text.count("refusing to fetch") == 5


def test_allow_listed_hosts_are_fetched():
    image = png_bytes(20, 20, (2, 2, 10, 10))
    with recording_server({"/a.png": (200, image, "image/png")}) as (host, seen):
        client = client_for(BlobEngine(), labelstudio=ls_settings(fetch_allow=["127.0.0.0/8"]))
        resp = client.post("/labelstudio/blobs/predict", json=predict_body([{"id": 1, "data": {"image": f"{host}/a.png"}}]))
    assert len(resp.json()["results"][0]["result"]) == 1 and len(seen) == 1


def test_credentials_in_label_studio_url_from_the_environment_never_replace_the_token(monkeypatch, caplog):
    """labelstudio.url refuses user:pw@ at start-up; LABEL_STUDIO_URL is read per call, so there
    they are dropped: httpx would otherwise send them as Basic auth in place of the API key."""
    image = png_bytes(20, 20, (2, 2, 10, 10))
    with recording_server({"/data/upload/1/a.png": (200, image, "image/png")}) as (host, seen):
        monkeypatch.setenv("LABEL_STUDIO_URL", host.replace("http://", "http://admin:SECRET@"))
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "a" * 40)
        resp = client_for(BlobEngine()).post("/labelstudio/blobs/predict",
                                             json=predict_body([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]))
    assert len(resp.json()["results"][0]["result"]) == 1
    assert [r.headers.get("Authorization") for r in seen] == ["Token " + "a" * 40]
    assert "SECRET" not in caplog.text


# ---- bearer tokens on: Label Studio routes need their own auth -----------------------------------

def test_tokens_on_without_basic_auth_refuses_and_runs_nothing():
    engine = BlobEngine()
    with recording_server() as (host, seen):
        client = client_for(engine, auth=AuthSettings(inference_tokens=["secret"]),
                            labelstudio=ls_settings(fetch_allow=["127.0.0.1"]))
        body = predict_body([{"id": 1, "data": {"image": f"{host}/a.png"}}, {"id": 2, "data": {"image": png_data_uri(9, 9, (1, 1, 5, 5))}}])
        for method, path, kwargs in [("post", "/labelstudio/blobs/predict", {"json": body}),
                                     ("post", "/labelstudio/blobs/setup", {"json": {"schema": RECT_CONFIG}}),
                                     ("get", "/labelstudio/blobs/health", {}),
                                     ("post", "/labelstudio/blobs/predict", {"json": body, "auth": ("any", "thing")})]:
            resp = getattr(client, method)(path, **kwargs)
            assert resp.status_code == 401, path
            assert "basic_auth_user" in resp.json()["message"] and "allow_unauthenticated" in resp.json()["message"]
        assert seen == [] and engine.calls == 0
        # The server's bearer token still works (for clients other than Label Studio).
        ok = client.post("/labelstudio/blobs/predict", json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200 and engine.calls == 1 and len(seen) == 1


def test_tokens_on_with_basic_auth_or_explicit_opt_out():
    tokens = AuthSettings(inference_tokens=["secret"])
    basic = client_for(BlobEngine(), auth=tokens, labelstudio=ls_settings(basic_auth_user="ls", basic_auth_pass="pw"))
    assert basic.get("/labelstudio/blobs/health").status_code == 401
    assert basic.get("/labelstudio/blobs/health", auth=("ls", "pw")).status_code == 200
    assert basic.post("/predictions/blobs", content=b"x").status_code == 401  # other doors keep their bearer check
    opened = client_for(BlobEngine(), auth=tokens, labelstudio=ls_settings(allow_unauthenticated=True))
    assert opened.get("/labelstudio/blobs/health").status_code == 200
    assert client_for(BlobEngine()).get("/labelstudio/blobs/health").status_code == 200  # no tokens: open as before


# ---- bounded memory ----------------------------------------------------------------------------

def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("image_mib, call_cap_mib, growth_cap_mib", [
    (2, 5, 60),
    pytest.param(10, 24, 150, marks=pytest.mark.slow),  # the case: 600 MB through loopback, ~9 s
])
def test_sixty_tasks_on_one_big_image_hold_bounded_bytes(image_mib, call_cap_mib, growth_cap_mib):
    """Issue 15 #3: a 4 KB /predict of 60 tasks on one 10 MB image grew the front by 835 MB."""
    mib = 1024 * 1024
    image = png_bytes(80, 50, (10, 5, 40, 30), pad_to=image_mib * mib)
    settings = ls_settings(fetch_allow=["127.0.0.1"], max_image_bytes=(image_mib + 1) * mib,
                           max_call_bytes=call_cap_mib * mib, max_inflight_bytes=2 * call_cap_mib * mib)
    with recording_server({"/big.png": (200, image, "image/png")}) as (host, seen):
        engine = BlobEngine()
        client = client_for(engine, labelstudio=settings)
        body = predict_body([{"id": i, "data": {"image": f"{host}/big.png"}} for i in range(60)])
        assert len(str(body)) < 8192
        measured = _peak_rss_reset()
        before = _vm_kib("VmRSS")
        resp = client.post("/labelstudio/blobs/predict", json=body)
        growth_mib = (_vm_kib("VmHWM") - before) / 1024
    assert resp.status_code == 200 and len(seen) == 60
    assert all(len(r["result"]) == 1 for r in resp.json()["results"])
    budget = client.app.state.labelstudio_backend.image_bytes
    assert budget.peak <= call_cap_mib * mib and budget.used == 0  # the call's cap, and all given back
    if measured:
        assert growth_mib < growth_cap_mib, f"front grew by {growth_mib:.0f} MiB"


def test_stored_setup_configs_are_bounded_in_count_and_size():
    client = client_for(BlobEngine(), labelstudio=ls_settings(max_projects=2, max_label_config_bytes=4096))
    for project in ("1.1", "2.1", "3.1"):
        assert client.post("/labelstudio/blobs/setup", json={"project": project, "schema": RECT_CONFIG}).status_code == 200
    task = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    forgotten = client.post("/labelstudio/blobs/predict", json={"tasks": task, "project": "1.1"})
    assert forgotten.status_code == 400 and "label_config" in forgotten.json()["message"]
    assert client.post("/labelstudio/blobs/predict", json={"tasks": task, "project": "3.1"}).status_code == 200
    huge = RECT_CONFIG.replace("</View>", "<!--" + "x" * 5000 + "--></View>")
    for path, field in (("setup", "schema"), ("predict", "label_config")):
        resp = client.post(f"/labelstudio/blobs/{path}", json={"project": "4.1", field: huge, "tasks": []})
        assert resp.status_code == 413 and "max_label_config_bytes" in resp.json()["message"]
    backend = client.app.state.labelstudio_backend
    projects, parsed = backend.stored_configs
    assert projects == 2 and parsed <= 2


def test_too_many_tasks_is_413_naming_the_limit():
    client = client_for(BlobEngine(), labelstudio=ls_settings(max_tasks=3))
    resp = client.post("/labelstudio/blobs/predict", json=predict_body([{"id": i, "data": {}} for i in range(4)]))
    assert resp.status_code == 413 and "labelstudio.max_tasks (3)" in resp.json()["message"]


def test_a_config_of_more_controls_than_anyone_labels_with_is_refused():
    controls = "".join(f'<RectangleLabels name="l{i}" toName="image"><Label value="Blob" predicted_values="blob"/>'
                       f'</RectangleLabels>' for i in range(65))
    config = f'<View><Image name="image" value="$image"/>{controls}</View>'
    engine = BlobEngine()
    task = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(task, config))
    assert resp.status_code == 400 and "more than 64" in resp.json()["message"]
    assert engine.calls == 0


def test_the_answer_of_one_call_is_bounded_in_bytes():
    tasks = [{"id": i, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}} for i in range(1, 6)]
    client = client_for(BlobEngine(), labelstudio=ls_settings(max_answer_bytes=1024))  # ~3 box regions
    resp = client.post("/labelstudio/blobs/predict", json=predict_body(tasks))  # one region per task
    assert resp.status_code == 413 and "labelstudio.max_answer_bytes (1024" in resp.json()["message"]
    ok = client.post("/labelstudio/blobs/predict", json=predict_body(tasks[:2]))
    assert ok.status_code == 200 and len(ok.content) < 1024


def test_many_brush_controls_over_large_images_are_refused_before_the_answer_grows():
    # 64 BrushLabels x 40 tasks of a 2000x1500 image: each control repeats every mask, a brush region
    # is kilobytes, and the whole answer used to be built (159 MB at 4000x3000, past the deadline).
    brushes = "".join(f'<BrushLabels name="m{i}" toName="image"><Label value="blob"/></BrushLabels>' for i in range(64))
    config = f'<View><Image name="image" value="$image"/>{brushes}</View>'
    image = png_data_uri(2000, 1500, (100, 100, 1900, 1400))
    tasks = [{"id": i, "data": {"image": image}} for i in range(1, 41)]
    client = client_for(BlobEngine(delay_s=0.0), labelstudio=ls_settings(max_answer_bytes=4 * 1024 * 1024))
    resp = client.post("/labelstudio/blobs/predict", json=predict_body(tasks, config))
    assert resp.status_code == 413 and "max_answer_bytes" in resp.json()["message"]
    one = client.post("/labelstudio/blobs/predict", json=predict_body(tasks[:1], config))
    assert one.status_code == 200
    regions = one.json()["results"][0]["result"]
    assert len(regions) == 64 and len({str(r["value"]["rle"]) for r in regions}) == 1
    mask = brush_rle_to_mask(regions[0]["value"]["rle"], 1500, 2000)
    assert (mask > 0).sum() == 1800 * 1300


def test_a_call_past_its_deadline_is_a_504_and_starts_no_more_images(monkeypatch):
    import dataclasses

    from service.protocols.labelstudio import backend
    from service.types import BatchSettings

    monkeypatch.setattr(backend, "PREDICT_DEADLINE_S", 0.5)
    engine = BlobEngine(delay_s=0.3)
    # a queue of 2 gives the call one image in the engine at a time
    engine.info = dataclasses.replace(engine.info, batch=BatchSettings(max_queue_size=2, request_timeout_ms=100))
    tasks = [{"id": i, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}} for i in range(1, 21)]
    resp = client_for(engine, labelstudio=ls_settings(max_concurrent_fetches=1)).post(
        "/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 504 and "deadline" in resp.json()["message"]
    assert engine.calls <= 6  # ~0.5 s of 0.3 s images at two at a time, not 20


# ---- wrong JSON types are 400s; one bad task URL fails only that task ----------------------------

@pytest.mark.parametrize("path, body", [
    ("setup", {"project": "1.1", "schema": 5}),
    ("setup", {"project": "1.1", "schema": ["<View/>"]}),
    ("setup", {"project": "1.1", "schema": RECT_CONFIG, "hostname": {"a": 1}}),
    ("setup", {"project": "1.1", "schema": RECT_CONFIG, "access_token": 12}),
    ("setup", {"project": {"id": 1}, "schema": RECT_CONFIG}),
    ("setup", {"project": True}),
    ("predict", {"tasks": [], "label_config": 7}),
    ("predict", {"tasks": {"id": 1}, "label_config": RECT_CONFIG}),
    ("predict", {"tasks": [1, 2], "label_config": RECT_CONFIG}),
    ("predict", {"tasks": [{"id": 1, "data": "x"}], "label_config": RECT_CONFIG}),
    ("predict", {"tasks": [{"id": 1, "data": None}], "label_config": RECT_CONFIG}),
    ("predict", {"tasks": [{"id": [1], "data": {}}], "label_config": RECT_CONFIG}),
    ("predict", {"tasks": [], "label_config": RECT_CONFIG, "project": [1]}),
    ("webhook", []),
])
def test_wrong_json_types_are_400(path, body):
    resp = client_for(BlobEngine()).post(f"/labelstudio/blobs/{path}", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] in ("invalid_request", "invalid_label_config")


def test_a_malformed_task_url_fails_only_that_task():
    tasks = [{"id": 1, "data": {"image": "http://["}}, {"id": 2, "data": {"image": "http://h:99999/a.png"}},
             {"id": 3, "data": {"image": ["not", "a", "url"]}},
             {"id": 4, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    resp = client_for(BlobEngine()).post("/labelstudio/blobs/predict", json=predict_body(tasks))
    assert resp.status_code == 200
    assert [len(r["result"]) for r in resp.json()["results"]] == [0, 0, 0, 1]


def test_token_refresh_answering_html_is_a_clean_per_task_error(caplog):
    with recording_server({"/api/token/refresh/": (200, b"<html>sign in</html>", "text/html")}) as (ls, seen):
        client = client_for(BlobEngine(), labelstudio=ls_settings(url=ls, api_key=PAT_KEY))
        resp = client.post("/labelstudio/blobs/predict", json=predict_body([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]))
    assert resp.status_code == 200 and resp.json()["results"][0]["result"] == []
    assert "without a JSON object" in caplog.text


# ---- metrics -----------------------------------------------------------------------------------

def test_predict_records_request_metrics_and_folds_unknown_models():
    labels = {"model": "blobs", "protocol": "labelstudio", "code": "200"}
    unknown = {"model": "_unknown", "protocol": "labelstudio", "code": "404"}
    bad = {"model": "blobs", "protocol": "labelstudio", "code": "400"}
    before = [sample("detserve_requests_total", x) for x in (labels, unknown, bad)]
    client = client_for(BlobEngine())
    task = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    assert client.post("/labelstudio/blobs/predict", json=predict_body(task)).status_code == 200
    for name in ("nope-1", "nope-2", "nope-3"):
        assert client.post(f"/labelstudio/{name}/predict", json=predict_body(task)).status_code == 404
    assert client.post("/labelstudio/blobs/predict", json={"tasks": 3}).status_code == 400
    after = [sample("detserve_requests_total", x) for x in (labels, unknown, bad)]
    assert [b - a for a, b in zip(before, after)] == [1, 3, 1]
    assert sample("detserve_requests_total", {"model": "nope-1", "protocol": "labelstudio", "code": "404"}) == 0
    assert sample("detserve_request_latency_seconds_count", {"model": "blobs", "protocol": "labelstudio"}) >= 2


# ---- settings ----------------------------------------------------------------------------------

def test_security_settings_validated_with_the_field_named(monkeypatch):
    from service.errors import ConfigError
    from service.settings import load_server_settings

    monkeypatch.setenv("DETSERVE_LABELSTUDIO__FETCH_ALLOW", '["10.0.0.0/8", "minio.internal", "::1"]')
    monkeypatch.setenv("DETSERVE_LABELSTUDIO__ALLOW_SETUP_HOSTNAME", "true")
    ls = load_server_settings().labelstudio
    assert ls.fetch_allow == ["10.0.0.0/8", "minio.internal", "::1"] and ls.allow_setup_hostname
    assert not LabelStudioSettings().allow_setup_hostname and not LabelStudioSettings().allow_unauthenticated
    monkeypatch.setenv("DETSERVE_LABELSTUDIO__FETCH_ALLOW", '["10.0.0.999"]')
    with pytest.raises(ConfigError, match="fetch_allow.*neither a CIDR"):
        load_server_settings()
    monkeypatch.delenv("DETSERVE_LABELSTUDIO__FETCH_ALLOW")
    monkeypatch.setenv("DETSERVE_LABELSTUDIO__MAX_CALL_BYTES", "1000")
    with pytest.raises(ConfigError, match="max_call_bytes .* must be >= max_image_bytes"):
        load_server_settings()


def test_env_settings_override_the_config_file_field_by_field(monkeypatch, tmp_path):
    from service.settings import load_server_settings

    config = tmp_path / "server.toml"
    config.write_text('[labelstudio]\nbasic_auth_user = "ls"\nurl = "http://from-file:8080"\n'
                      '[labelstudio.jobs]\non_import_projects = [3]\npage_size = 50\n')
    monkeypatch.setenv("DETSERVE_LABELSTUDIO__URL", "http://from-env:8080")
    monkeypatch.setenv("DETSERVE_LABELSTUDIO__JOBS__STORE_PATH", str(tmp_path / "jobs.sqlite3"))
    ls = load_server_settings(config).labelstudio
    assert ls.url == "http://from-env:8080" and ls.basic_auth_user == "ls"  # the env wins, the file's rest stays
    assert ls.jobs.store_path == tmp_path / "jobs.sqlite3"
    assert (ls.jobs.on_import_projects, ls.jobs.page_size) == ([3], 50)


def test_label_studio_routes_follow_the_data_plane_readiness():
    """Starting and draining come from the one readiness source every door uses, with its rules."""
    client = client_for(BlobEngine())
    task = [{"id": 1, "data": {"image": png_data_uri(20, 20, (2, 2, 10, 10))}}]
    dataplane = client.app.state.dataplane
    dataplane.starting = True
    assert client.get("/labelstudio/blobs/health").status_code == 503
    assert client.post("/labelstudio/blobs/predict", json=predict_body(task)).status_code == 503
    dataplane.starting = False
    dataplane.draining = True  # accepted while draining, as on every door: the listeners stop new connections
    assert client.post("/labelstudio/blobs/predict", json=predict_body(task)).status_code == 200


def test_predict_detects_with_the_projects_tiling_and_skips_masks_for_boxes():
    from service.types import MaskFormat, TileMerge

    engine = BlobEngine()
    config = RECT_CONFIG.replace('toName="image"', 'toName="image" model_tile="640" model_tile_merge="nmm"')
    tasks = [{"id": 1, "data": {"image": png_data_uri(80, 50, (10, 5, 40, 30))}}]
    resp = client_for(engine).post("/labelstudio/blobs/predict", json=predict_body(tasks, config))
    assert resp.status_code == 200 and resp.json()["results"][0]["result"]
    (options,) = engine.options
    assert (options.tile, options.tile_merge, options.mask_format) == (640, TileMerge.NMM, MaskFormat.NONE)
    bad = client_for(engine).post("/labelstudio/blobs/setup", json={
        "project": "1.1", "schema": RECT_CONFIG.replace('toName="image"', 'toName="image" model_tile="7"')})
    assert bad.status_code == 400 and "model_tile" in bad.json()["message"]
