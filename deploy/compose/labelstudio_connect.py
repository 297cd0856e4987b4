"""Create a Label Studio project whose labels are a detserve model's classes and connect it to
detserve's ML backend route. Runs once inside the Label Studio image (standard library only).

Env: LABEL_STUDIO_URL, LABEL_STUDIO_TOKEN (legacy token), DETSERVE_BACKEND_URL,
DETSERVE_MODEL_FOLDER (reads classes from model.toml) or LABELS (comma-separated),
DETSERVE_BASIC_AUTH_USER / DETSERVE_BASIC_AUTH_PASS (the Basic auth pair of detserve's /labelstudio routes).
"""
from __future__ import annotations

import json
import os
import sys
import time
import tomllib
import urllib.error
import urllib.request
from xml.sax.saxutils import quoteattr

LS_URL = os.environ.get("LABEL_STUDIO_URL", "http://label-studio:8080").rstrip("/")
TOKEN = os.environ["LABEL_STUDIO_TOKEN"]
BACKEND_URL = os.environ.get("DETSERVE_BACKEND_URL", "http://detserve:8080/labelstudio/rtmdet")


def call(method: str, path: str, body: dict | None = None) -> dict | list:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(LS_URL + path, data=data, method=method)
    req.add_header("Authorization", f"Token {TOKEN}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def labels() -> list[str]:
    if os.environ.get("LABELS"):
        return [x.strip() for x in os.environ["LABELS"].split(",") if x.strip()]
    folder = os.environ.get("DETSERVE_MODEL_FOLDER", "/models/rtmdet")
    with open(os.path.join(folder, "model.toml"), "rb") as f:
        cfg = tomllib.load(f)
    if cfg.get("classes"):
        return list(cfg["classes"])
    if cfg.get("classes_file"):
        with open(os.path.join(folder, cfg["classes_file"]), encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    sys.exit(f"{folder}/model.toml lists no classes; set LABELS=a,b,c")


def wait_for_label_studio(deadline_s: float = 180) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            call("GET", "/api/projects")
            return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > end:
                sys.exit(f"Label Studio at {LS_URL} not answering: {exc}")
            time.sleep(3)


def main() -> None:
    wait_for_label_studio()
    tags = "".join(f"<Label value={quoteattr(name)}/>" for name in labels())
    config = f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{tags}</RectangleLabels></View>'
    project = call("POST", "/api/projects", {"title": "detserve demo", "label_config": config})
    ml = {"url": BACKEND_URL, "project": project["id"], "title": "detserve"}
    if os.environ.get("DETSERVE_BASIC_AUTH_USER"):
        ml.update(auth_method="BASIC_AUTH", basic_auth_user=os.environ["DETSERVE_BASIC_AUTH_USER"],
                  basic_auth_pass=os.environ.get("DETSERVE_BASIC_AUTH_PASS", ""))
    backend = call("POST", "/api/ml", ml)
    print(f"project {project['id']} connected to {BACKEND_URL} (ml backend {backend.get('id')})")


if __name__ == "__main__":
    main()
