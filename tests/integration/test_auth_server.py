"""Token auth on the real server: `detserve serve` as a subprocess with inference tokens from the
environment and management tokens from a file. Every door refuses a missing, wrong, or other-API
token (401/403 over HTTP, UNAUTHENTICATED/PERMISSION_DENIED over gRPC), accepts the right one, and
leaves health and metrics open. Workers run tests/fakes.py's predictor; the rest is production code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import httpx
import pytest

pytestmark = pytest.mark.integration
# The server needs the engine and the gRPC door; skip (not fail) in a tree where they have not landed.
pytest.importorskip("service.engine.engine")
pytest.importorskip("service.protocols.grpc.server")

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
from fakes import write_model  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

INFERENCE_TOKEN = "inf-7f3c2a9e"
MANAGEMENT_TOKEN = "mgmt-51b0d8c4"
WRONG_TOKEN = "inf-7f3c2a9f"  # right prefix, wrong last character


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-server")
    store = root / "store"
    write_model(store, "m", workers=1)
    tokens_file = root / "management.tokens"
    tokens_file.write_text(f"# operators\n{MANAGEMENT_TOKEN}\n")
    env = {"DETSERVE_AUTH__INFERENCE_TOKENS": json.dumps([INFERENCE_TOKEN]),
           "DETSERVE_AUTH__MANAGEMENT_TOKENS_FILE": str(tokens_file)}
    srv = ServeProcess(store, root, grpc=True, env=env, nice=10)
    try:
        srv.wait_ready(90)
        urls = {"inference": srv.url, "management": srv.mgmt, "metrics": srv.metrics}
        yield {"urls": urls, "grpc": srv.grpc_target, "log": srv.log_path}
    finally:
        srv.stop()


def assert_refused(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == ("unauthenticated" if status == 401 else "permission_denied")
    assert INFERENCE_TOKEN not in response.text and MANAGEMENT_TOKEN not in response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("request_args", [
    ("PUT", "/predictions/m"),
    ("GET", "/v2/models/m"),
    ("POST", "/v2/models/m/infer"),
], ids=["torchserve", "kserve-metadata", "kserve-infer"])
def test_inference_routes_refuse_missing_wrong_and_management_tokens(server, request_args):
    method, path = request_args
    url = server["urls"]["inference"] + path
    body = b"ok-image" if path.startswith("/predictions") else (b"{}" if method == "POST" else None)
    assert_refused(httpx.request(method, url, content=body, timeout=10), 401)
    assert_refused(httpx.request(method, url, content=body, headers={"Authorization": "Basic Zm9vOmJhcg=="},
                                 timeout=10), 401)
    assert_refused(httpx.request(method, url, content=body, headers=bearer(WRONG_TOKEN), timeout=10), 401)
    assert_refused(httpx.request(method, url, content=body, headers=bearer(MANAGEMENT_TOKEN), timeout=10), 403)


def test_right_inference_token_succeeds(server):
    base = server["urls"]["inference"]
    r = httpx.put(f"{base}/predictions/m", content=b"ok-image", headers=bearer(INFERENCE_TOKEN), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == []
    r = httpx.get(f"{base}/v2/models/m", headers=bearer(INFERENCE_TOKEN), timeout=10)
    assert r.status_code == 200 and r.json()["name"] == "m"


def test_management_api_takes_only_management_tokens(server):
    url = server["urls"]["management"] + "/models"
    assert_refused(httpx.get(url, timeout=10), 401)
    assert_refused(httpx.get(url, headers=bearer("mgmt-51b0d8c5"), timeout=10), 401)
    assert_refused(httpx.get(url, headers=bearer(INFERENCE_TOKEN), timeout=10), 403)
    r = httpx.get(url, headers=bearer(MANAGEMENT_TOKEN), timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/ping", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_health_stays_open(server, path):
    assert httpx.get(server["urls"]["inference"] + path, timeout=10).status_code == 200


def test_metrics_stay_open(server):
    r = httpx.get(server["urls"]["metrics"] + "/metrics", timeout=10)
    assert r.status_code == 200 and "detserve_requests_total" in r.text


def test_grpc_refuses_bad_tokens_and_accepts_the_right_one(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.protocols.grpc.generated import detserve_pb2, detserve_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

    with grpc.insecure_channel(server["grpc"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a token

        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        detector = detserve_pb2_grpc.DetectorStub(channel)
        calls = [
            lambda md: kserve.ModelMetadata(grpc_service_pb2.ModelMetadataRequest(name="m"), metadata=md, timeout=10),
            lambda md: detector.Detect(detserve_pb2.DetectRequest(model="m", image=detserve_pb2.Image(encoded=b"ok")),
                                       metadata=md, timeout=30),
        ]
        for call in calls:
            for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", "Bearer"),), grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", f"Bearer {WRONG_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", f"Bearer {MANAGEMENT_TOKEN}"),), grpc.StatusCode.PERMISSION_DENIED)]:
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == code, (metadata, info.value.details())
            call((("authorization", f"Bearer {INFERENCE_TOKEN}"),))


def test_log_names_the_management_binding_and_never_the_tokens(server):
    text = server["log"].read_text(errors="replace")
    assert INFERENCE_TOKEN not in text and MANAGEMENT_TOKEN not in text
    assert "management API bound to 127.0.0.1" in text  # closed to the network by default, and said so
