"""Kubernetes manifests: every kustomization renders offline, built-in kinds pass the Kubernetes
schemas strictly, CRD kinds are checked for the fields detserve relies on, and the manifests agree
with the app (probe paths, ports, drain time, CLI flags, metric names)."""
from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from service.observability import metrics
from service.settings import ServerSettings, load_server_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# Not bare "gpu": tests/conftest.py skips items carrying a "gpu" keyword when CUDA is absent.
OVERLAY_IDS = [f"{o}-overlay" for o in OVERLAYS]
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu", "monitoring", "kserve")
K8S_VERSION = "1.37.0"
CRD_KINDS = {"ServiceMonitor", "InferenceService", "ServingRuntime"}
# The documented probe endpoints, used only when the REST app cannot be imported.
DOCUMENTED_PATHS = {"/healthz", "/readyz", "/ping"}

KUBECTL = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) not installed")

_cache: dict[str, list[dict]] = {}


def render(kustomization: str) -> list[dict]:
    if kustomization not in _cache:
        out = subprocess.run([KUBECTL, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        _cache[kustomization] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return copy.deepcopy(_cache[kustomization])


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment", "detserve")["spec"]["template"]["spec"]["containers"][0]


def server_toml(docs: list[dict]) -> dict:
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["name"].startswith("detserve-config")
    return tomllib.loads(cm["data"]["server.toml"])


# ---- rendering and schemas ----------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=[k.replace("/", "-") for k in KUSTOMIZATIONS])
def test_every_kustomization_renders(kustomization):
    docs = render(kustomization)
    assert docs and all("kind" in d and "apiVersion" in d for d in docs)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_builtin_kinds_pass_strict_kubernetes_schemas(overlay):
    import kubernetes_validate

    docs = render(f"overlays/{overlay}") + render("monitoring") + render("kserve")
    checked = set()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.add(doc["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount", "NetworkPolicy",
            "HorizontalPodAutoscaler"} <= checked


@needs_kubectl
def test_schema_validation_is_not_vacuous():
    import kubernetes_validate

    deployment = one(render("overlays/cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@needs_kubectl
def test_crd_kinds_have_the_fields_detserve_relies_on():
    monitor = one(render("monitoring"), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(render("base"), "Service", "detserve")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    kserve = render("kserve")
    isvc = one(kserve, "InferenceService")
    runtime = one(kserve, "ServingRuntime")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "v2" in runtime["spec"]["protocolVersions"]
    kserve_container = runtime["spec"]["containers"][0]
    assert kserve_container["name"] == "kserve-container"
    assert kserve_container["ports"][0]["containerPort"] == ServerSettings().inference_port
    parse_serve_args(kserve_container["args"])
    assert "command" not in kserve_container  # keeps the image's entrypoint: tini, then detserve


# ---- invariants against the app -----------------------------------------------------------------

def app_paths_that_answer(paths: set[str]) -> set[str]:
    """Paths the real inference app routes (anything but 404); the documented list as a fallback."""
    try:
        from fastapi.testclient import TestClient

        from service.protocols.rest.app import build_inference_app
    except ModuleNotFoundError:
        return paths & DOCUMENTED_PATHS
    app = build_inference_app(None, ServerSettings())
    app.state.dataplane.starting = True  # the engine is never consulted while starting
    with TestClient(app) as client:
        assert client.get("/no-such-probe-path").status_code == 404
        return {p for p in paths if client.get(p).status_code != 404}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_probes_hit_paths_and_ports_the_app_serves(overlay):
    docs = render(f"overlays/{overlay}")
    c = container(docs)
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    http_paths = {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert app_paths_that_answer(http_paths) == http_paths
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert named.get(port, port) == server_toml(docs)["inference_port"]
    # grpc.health.v1 on the gRPC port gates start-up (the gRPC server starts once models are loaded).
    assert c["startupProbe"]["grpc"]["port"] == server_toml(docs)["grpc_port"]
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_ports_agree_between_settings_configmap_container_and_services(overlay):
    docs = render(f"overlays/{overlay}")
    toml = server_toml(docs)
    defaults = ServerSettings()
    expected = {"http": defaults.inference_port, "management": defaults.management_port,
                "metrics": defaults.metrics_port, "grpc": defaults.grpc_port}
    assert {k: toml[f"{'inference' if k == 'http' else k}_port"] for k in expected} == expected
    named = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert named == expected

    public = one(docs, "Service", "detserve")
    assert {p["targetPort"] for p in public["spec"]["ports"]} == {"http", "grpc", "metrics"}
    assert all(p["port"] == named[p["targetPort"]] for p in public["spec"]["ports"])
    mgmt = one(docs, "Service", "detserve-management")
    assert mgmt["spec"]["type"] == "ClusterIP"
    assert [p["targetPort"] for p in mgmt["spec"]["ports"]] == ["management"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_configmap_is_a_valid_server_config(overlay, tmp_path, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("DETSERVE_")]:
        monkeypatch.delenv(key)
    path = tmp_path / "server.toml"
    path.write_text(one(render(f"overlays/{overlay}"), "ConfigMap")["data"]["server.toml"])
    settings = load_server_settings(path)
    assert settings.management_address == "0.0.0.0"  # in a pod; the NetworkPolicy guards it
    assert not settings.auth.inference_tokens and not settings.auth.management_tokens  # tokens come from a Secret


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_grace_period_outlasts_prestop_and_drain(overlay):
    docs = render(f"overlays/{overlay}")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    drain = server_toml(docs)["drain_timeout_s"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop = float(command[1]) if command[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    assert drain >= ServerSettings().drain_timeout_s


def parse_serve_args(args: list[str]) -> argparse.Namespace:
    from service.commands import serve

    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(args)


@needs_kubectl
def test_container_args_are_accepted_by_the_cli_and_config_is_mounted():
    docs = render("overlays/cpu")
    c = container(docs)
    ns = parse_serve_args(c["args"])
    assert ns.command == "serve"
    assert "command" not in c  # args only: the image's entrypoint (tini, then detserve) stays
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert Path(ns.config).parent == Path(mounts["config"])
    for env in c["env"]:
        if env["name"].startswith("DETSERVE_AUTH__"):
            field = env["name"].removeprefix("DETSERVE_AUTH__").lower()
            assert field in ServerSettings.model_fields["auth"].annotation.model_fields
            assert env["valueFrom"]["secretKeyRef"]["optional"] is True


@needs_kubectl
def test_management_port_is_cluster_internal():
    policy = one(render("base"), "NetworkPolicy")
    mgmt_port = ServerSettings().management_port
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if mgmt_port in ports:
            assert ports == {mgmt_port}
            peers = rule["from"]
            assert peers and all("ipBlock" not in peer for peer in peers)
            assert all(peer.get("podSelector", {}).get("matchLabels") for peer in peers)
        else:
            assert "from" not in rule  # inference, gRPC and metrics stay reachable
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "detserve"}


@needs_kubectl
def test_pod_runs_unprivileged_with_requests_and_a_pdb():
    docs = render("overlays/cpu")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]


@needs_kubectl
def test_gpu_overlay_requests_a_gpu_and_tolerates_gpu_nodes():
    pod = one(render("overlays/gpu"), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert container(render("overlays/gpu"))["image"].endswith(":gpu")
    assert container(render("overlays/cpu"))["image"].endswith(":cpu")


def series_names() -> set[str]:
    """Every series name the registry exports (counters gain _total, histograms _bucket/_sum/_count)."""
    names = set()
    for family in metrics.REGISTRY.collect():
        for suffix in ("", "_total", "_created", "_bucket", "_sum", "_count"):
            names.add(family.name + suffix)
    return names


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_hpa_scales_on_queue_depth_served_by_the_adapter_rule_with_cpu_fallback(overlay):
    hpa = one(render(f"overlays/{overlay}"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "detserve"}
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    custom = kinds["Pods"]["pods"]["metric"]["name"]
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    assert custom in served
    assert "queue_depth" in custom or "queue_wait" in custom
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_adapter_rules_query_metrics_detserve_exports():
    known = series_names()
    for rule in adapter_rules():
        series = re.match(r"[a-z_:]+", rule["seriesQuery"]).group(0)
        assert series in known, series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        for name in re.findall(r"detserve_[a-z_]+", rule["metricsQuery"]):
            assert name in known, name


@needs_kubectl
def test_auto_backend_cache_is_an_emptydir_at_detserve_cache_dir():
    docs = render("overlays/cpu")
    c = container(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["cache"]["mountPath"] == env["DETSERVE_CACHE_DIR"] and not mounts["cache"].get("readOnly")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "cache")
