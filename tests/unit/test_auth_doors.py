"""Auth and CORS switches on the REST apps, in process: health and metrics are open by default and
close when configured; CORS answers only when origins are configured."""
from __future__ import annotations

import pytest

pytest.importorskip("service.protocols.rest.app")

from fastapi.testclient import TestClient  # noqa: E402

from service.protocols.rest.app import build_inference_app, build_metrics_app  # noqa: E402
from service.settings import AuthSettings, ServerSettings  # noqa: E402

INF, MGMT = "inf-token-1", "mgmt-token-1"


def settings(**auth) -> ServerSettings:
    return ServerSettings(auth=AuthSettings(inference_tokens=[INF], management_tokens=[MGMT], **auth))


def starting_app(s: ServerSettings):
    app = build_inference_app(None, s)
    app.state.dataplane.starting = True  # health answers without consulting the engine
    return app


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def test_metrics_open_by_default_and_closed_by_protect_metrics():
    with TestClient(build_metrics_app(settings())) as client:
        assert client.get("/metrics").status_code == 200
    with TestClient(build_metrics_app(settings(protect_metrics=True))) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=auth(INF)).status_code == 403
        assert client.get("/metrics", headers=auth(MGMT)).status_code == 200


def test_health_open_by_default_and_closed_by_protect_health():
    with TestClient(starting_app(settings())) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # starting, but answered without a token
    with TestClient(starting_app(settings(protect_health=True))) as client:
        assert client.get("/healthz").status_code == 401
        assert client.get("/healthz", headers=auth(INF)).status_code == 200


def preflight(client: TestClient):
    return client.options("/healthz", headers={"Origin": "https://labeling.example.com",
                                                "Access-Control-Request-Method": "GET"})


def test_cors_off_by_default_and_configurable():
    with TestClient(starting_app(ServerSettings())) as client:
        assert "access-control-allow-origin" not in preflight(client).headers
        assert "access-control-allow-origin" not in client.get(
            "/healthz", headers={"Origin": "https://labeling.example.com"}).headers
    s = ServerSettings(cors_origins=["https://labeling.example.com"])
    with TestClient(starting_app(s)) as client:
        assert preflight(client).headers["access-control-allow-origin"] == "https://labeling.example.com"
