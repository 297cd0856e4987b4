"""A real Label Studio 1.23.2 on loopback, for the acceptance tests and the job measurements.

Label Studio lives in its own virtualenv (`.venv-labelstudio`, or $DETSERVE_LABELSTUDIO_VENV),
installed on first use: it pins its own Django and label-studio-sdk, which must not touch
detserve's. It runs with SQLite in a data folder of the caller's; a freshly migrated database with
the admin user is kept next to the venv, so later starts take seconds instead of minutes.

`LsClient` is the handful of REST calls the tests and measurements make (projects, uploads, JSON
task imports, tasks, predictions, connecting an ML backend), with the legacy token.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .servers import ROOT, free_port

LS_VERSION = "1.23.2"
LS_VENV = Path(os.environ.get("DETSERVE_LABELSTUDIO_VENV", ROOT / ".venv-labelstudio"))
LS_PYTHON = LS_VENV / "bin" / "python"
DB_NAME = "label_studio.sqlite3"
TEMPLATE_DB = LS_VENV / "detserve-template" / DB_NAME  # lives and dies with the venv, so with its version
LEGACY_TOKEN = "d37e5e2f0c6b4b1a9e8d7c6b5a4f3e2d1c0b9a87"  # 40 hex, as Label Studio's own tokens
UPLOAD_BATCH = 50  # files per import request: Django refuses more than DATA_UPLOAD_MAX_NUMBER_FILES (100)


def ensure_label_studio() -> Path:
    """The venv's python, installing Label Studio first when it is absent or another version."""
    probe = [str(LS_PYTHON), "-c", "import importlib.metadata as m; print(m.version('label-studio'))"]
    if LS_PYTHON.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == LS_VERSION:
        return LS_PYTHON
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LS_VENV)], check=True)
    subprocess.run(["nice", "-n", "10", str(LS_PYTHON), "-m", "pip", "install", "-q", f"label-studio=={LS_VERSION}"],
                   check=True, timeout=3000)
    return LS_PYTHON


def _save_template(db: Path) -> None:
    TEMPLATE_DB.parent.mkdir(exist_ok=True)
    partial = TEMPLATE_DB.with_suffix(".partial")
    with sqlite3.connect(db) as src, sqlite3.connect(partial) as dst:
        src.backup(dst)  # consistent even while Label Studio has the file open
    partial.rename(TEMPLATE_DB)


@dataclass
class RunningLabelStudio:
    url: str
    pat: str  # a personal access token (JWT refresh token), what detserve is configured with
    log: Path
    python: Path
    pid: int  # the `label-studio start` process (its children serve too)
    token: str = LEGACY_TOKEN

    def client(self) -> "LsClient":
        return LsClient(self.url, self.token)


class LabelStudio:
    """`label-studio start` in `data`, on 127.0.0.1 and a free port; a context manager.

    Backends on loopback are allowed (ML_BLOCK_LOCAL_IP=false) and webhooks to them are sent
    (SSRF_PROTECTION_ENABLED=false), as docs/labelstudio.md tells users of a local setup to do."""

    def __init__(self, data: Path, *, start_timeout_s: float = 900):
        self.data = Path(data)
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> RunningLabelStudio:
        python = ensure_label_studio()
        self.data.mkdir(parents=True, exist_ok=True)
        if TEMPLATE_DB.exists():
            shutil.copyfile(TEMPLATE_DB, self.data / DB_NAME)
        port = free_port()
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(self.data), "ML_BLOCK_LOCAL_IP": "false",
               "SSRF_PROTECTION_ENABLED": "false", "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false",
               "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "DATA_UPLOAD_MAX_NUMBER_FILES": "100"}
        log = self.data / "label-studio.log"
        cmd = [str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "-p", str(port), "--username", "admin@example.com", "--password", "admin-Passw0rd",
               "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"]
        # Label Studio inherits the caller's niceness; another `nice` would push it to 19 and starve
        # it on a shared machine.
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.data,
                                         start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait(f"{url}/health", log)
            if not TEMPLATE_DB.exists():
                _save_template(self.data / DB_NAME)
            pat = httpx.post(f"{url}/api/token/", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=30)
            if pat.status_code != 201:
                raise RuntimeError(f"Label Studio refused a personal access token: {pat.status_code} {pat.text[:300]}")
        except BaseException:
            self.stop()
            raise
        return RunningLabelStudio(url=url, pat=pat.json()["token"], log=log, python=python, pid=self.proc.pid)

    def _wait(self, url: str, log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited early:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(url, timeout=3).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{url} not up in {self.start_timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> RunningLabelStudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LsClient:
    """The Label Studio REST calls a test or a measurement makes, with the legacy token."""

    def __init__(self, url: str, token: str = LEGACY_TOKEN, timeout_s: float = 600):
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=timeout_s,
                                 trust_env=False)

    def close(self) -> None:
        self.http.close()

    def _ok(self, resp: httpx.Response) -> httpx.Response:
        if resp.is_error:
            raise RuntimeError(f"Label Studio: {resp.request.method} {resp.request.url.path} answered "
                               f"{resp.status_code}: {resp.text[:500]}")
        return resp

    def create_project(self, title: str, label_config: str) -> int:
        return self._ok(self.http.post("/api/projects", json={"title": title, "label_config": label_config})).json()["id"]

    def upload(self, project: int, files: list[str]) -> None:
        """Each file becomes one task whose image is served from /data/upload/..."""
        for start in range(0, len(files), UPLOAD_BATCH):
            handles = [(f"file{i}", (Path(p).name, open(p, "rb"))) for i, p in enumerate(files[start:start + UPLOAD_BATCH])]
            try:
                self._ok(self.http.post(f"/api/projects/{project}/import", files=handles))
            finally:
                for _, (_, fh) in handles:
                    fh.close()

    def import_tasks(self, project: int, tasks: list[dict]) -> None:
        """Tasks as JSON (e.g. {"image": "/data/upload/1/..."}: images another project uploaded)."""
        self._ok(self.http.post(f"/api/projects/{project}/import", json=tasks))

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project (id, data, predictions), in id order."""
        out, page = [], 1
        while True:
            resp = self.http.get("/api/tasks", params={"project": project, "page": page, "page_size": 500,
                                                       "fields": "all"})
            if resp.status_code == 404 and page > 1:
                return out
            body = self._ok(resp).json()
            batch = body["tasks"] if isinstance(body, dict) else body
            out.extend(batch)
            if len(batch) < 500:
                return out
            page += 1

    def predictions(self, project: int) -> list[dict]:
        body = self._ok(self.http.get("/api/predictions", params={"task__project": project})).json()
        return body if isinstance(body, list) else body["results"]

    def connect_backend(self, project: int, url: str, basic_auth: tuple[str, str] | None = None,
                        title: str = "detserve") -> dict:
        """What "Connect Model" does: Label Studio checks /health and /setup and creates the webhook."""
        body = {"project": project, "url": url, "title": title, "auth_method": "NONE"}
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        return self._ok(self.http.post("/api/ml", json=body)).json()

    def webhooks(self, project: int) -> list[dict]:
        return self._ok(self.http.get("/api/webhooks", params={"project": project})).json()
