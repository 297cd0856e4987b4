"""The Label Studio ML backend behaviour behind `/labelstudio/{model}/...`, independent of FastAPI.

One instance per app holds what must outlive a request: access tokens obtained from personal
access tokens, and what each project's /setup call told us (its config, LS host and token).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx

from ...engine.api import EngineAPI
from ...errors import DetserveError, InvalidRequest, ModelNotReady, PayloadTooLarge
from ...settings import ServerSettings
from ...types import DetectOptions, DetectResult, EncodedImage, ModelInfo
from ...types import Protocol as Door
from .config import BoundControl, ConfigInvalid, bind_controls, parse_label_config
from .fetch import FetchConfig, ImageFetcher, TokenCache
from .results import task_prediction

log = logging.getLogger("detserve.labelstudio")

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
MAX_CONCURRENT_FETCHES = 16
MAX_PROJECTS = 1024
UNDEFINED_KEY = "$undefined$"  # LS's data key for tasks imported without a column name
# Label Studio waits ML_TIMEOUT_PREDICT (100 s) for a whole /predict call. Its tasks queue behind
# each other, so the per-image default deadline would fail the tail of a large call.
PREDICT_DEADLINE_S = 95.0


@dataclass(frozen=True, slots=True)
class ProjectSetup:
    """What LS sent to /setup for one project; fills in for unset settings."""

    label_config: str | None
    hostname: str | None
    access_token: str | None


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def basic_auth_credentials(settings: ServerSettings) -> tuple[str, str] | None:
    """(user, password) when Basic auth is on: settings first, then BASIC_AUTH_USER/BASIC_AUTH_PASS."""
    ls = settings.labelstudio
    user = ls.basic_auth_user or _env("BASIC_AUTH_USER")
    password = ls.basic_auth_pass or _env("BASIC_AUTH_PASS")
    return (user, password or "") if user else None


def fetch_config(settings: ServerSettings, setup: ProjectSetup | None = None) -> FetchConfig:
    ls = settings.labelstudio
    url = ls.url or _env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST") or (setup.hostname if setup else None)
    root = ls.document_root or _env("LOCAL_FILES_DOCUMENT_ROOT")
    return FetchConfig(
        url=url.rstrip("/") if url else None,
        api_key=ls.api_key or _env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN") or (setup.access_token if setup else None),
        document_root=Path(root) if root else None,
        timeout_s=ls.fetch_timeout_s,
        max_bytes=ls.max_image_bytes,
        verify_ssl=(_env("VERIFY_SSL") or "true").lower() not in ("false", "0", "no"),
    )


class LabelStudioBackend:
    def __init__(self) -> None:
        self.tokens = TokenCache()
        self._projects: OrderedDict[str, ProjectSetup] = OrderedDict()

    # -- endpoints -------------------------------------------------------------------------

    def health(self, engine: EngineAPI, model: str) -> dict:
        info = self._ready_info(engine, model)
        return {"status": "UP", "model_class": "detserve", "model": model, "model_version": info.version}

    def setup(self, engine: EngineAPI, model: str, body: dict) -> dict:
        info = self._ready_info(engine, model)
        schema = body.get("schema")
        if schema:
            self._bind(info, schema)  # a config the model cannot fill fails the connection, with the reason
        project = body.get("project")
        if project is not None:
            self._remember(
                str(project),
                ProjectSetup(label_config=schema, hostname=body.get("hostname"), access_token=body.get("access_token")),
            )
        return {"model_version": info.version}

    def versions(self, engine: EngineAPI, model: str) -> dict:
        return {"versions": [engine.model_info(model).version]}

    @staticmethod
    def webhook(body: dict) -> tuple[int, dict]:
        action = body.get("action") if isinstance(body, dict) else None
        if action not in TRAIN_EVENTS:
            return 200, {"status": "Unknown event"}
        log.info("label studio %s event acknowledged; detserve does not train models", action)
        return 201, {"result": {"trained": False, "reason": "detserve serves models; it does not train them"}, "status": "ok"}

    async def predict(self, engine: EngineAPI, settings: ServerSettings, model: str, body: dict) -> dict:
        started = time.perf_counter()
        info = self._ready_info(engine, model)
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise InvalidRequest("/predict body needs 'tasks': a list of task objects")
        project = str(body["project"]) if body.get("project") is not None else None
        setup = self._projects.get(project) if project else None
        label_config = body.get("label_config") or (setup.label_config if setup else None)
        if not label_config:
            raise ConfigInvalid("/predict needs 'label_config' (or an earlier /setup for this project)")
        controls = self._bind(info, label_config)
        config = fetch_config(settings, setup)
        request_id = uuid.uuid4().hex[:12]
        async with httpx.AsyncClient(follow_redirects=True, verify=config.verify_ssl, timeout=config.timeout_s) as client:
            run = _PredictRun(engine, info, controls, ImageFetcher(config, client, self.tokens), request_id)
            predictions = await run.all(tasks)
        log.info(
            "label studio predict %s: model %s, %d tasks, %d without an image, %.2f s",
            request_id, model, len(tasks), run.failed, time.perf_counter() - started,
        )
        return {"results": predictions}

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _ready_info(engine: EngineAPI, model: str) -> ModelInfo:
        info = engine.model_info(model)  # raises ModelNotFound
        if not info.ready or not info.version:
            raise ModelNotReady(f"model '{model}' is not ready yet")
        return info

    @staticmethod
    def _bind(info: ModelInfo, label_config: str) -> list[BoundControl]:
        return bind_controls(
            parse_label_config(label_config),
            model=info.name,
            classes=tuple(info.classes),
            has_masks=info.has_masks,
            default_score_thr=info.default_score_thr,
        )

    def _remember(self, project: str, setup: ProjectSetup) -> None:
        self._projects[project] = setup
        self._projects.move_to_end(project)
        while len(self._projects) > MAX_PROJECTS:
            self._projects.popitem(last=False)


class _PredictRun:
    """One /predict call: every task's images fetched and detected concurrently, so the engine's
    scheduler sees them all at once and batches them."""

    def __init__(self, engine: EngineAPI, info: ModelInfo, controls: list[BoundControl], fetcher: ImageFetcher, request_id: str):
        self.engine = engine
        self.info = info
        self.controls = controls
        self.fetcher = fetcher
        self.request_id = request_id
        self.failed = 0
        # No class filter here: the regions stay exactly what /predictions returns for the image.
        self.options = DetectOptions(score_thr=min(c.score_threshold for c in controls))
        self.deadline = time.monotonic() + max(PREDICT_DEADLINE_S, info.batch.request_timeout_ms / 1000)
        self.fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self.detect_slots = asyncio.Semaphore(max(1, info.batch.max_queue_size // 2))  # room for other traffic

    async def all(self, tasks: list[dict]) -> list[dict]:
        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(self.one(task)) for task in tasks]
        except* DetserveError as grouped:
            raise grouped.exceptions[0] from None  # engine trouble fails the call: LS retries it later
        return [job.result() for job in jobs]

    async def one(self, task: dict) -> dict:
        task_id = task.get("id")
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        by_image: dict[str, list[BoundControl]] = {}
        for control in self.controls:
            by_image.setdefault(control.tag.image_key, []).append(control)
        regions, scores = [], []
        for key, controls in by_image.items():
            result = await self._detect(task_id, data.get(key, data.get(UNDEFINED_KEY)), key)
            if result is not None and any(c.tag.kind.needs_masks for c in controls):
                # Mask decoding and contour/RLE encoding cost milliseconds per region: keep them
                # off the event loop that serves every other request.
                item = await asyncio.to_thread(task_prediction, result, controls, self.info.version)
            else:
                item = task_prediction(result, controls, self.info.version)
            regions.extend(item["result"])
            scores.extend(r["score"] for r in item["result"])
        score = round(sum(scores) / len(scores), 5) if scores else 0.0
        return {"result": regions, "score": score, "model_version": self.info.version}

    async def _detect(self, task_id, ref, key: str) -> DetectResult | None:
        try:
            if ref is None:
                raise InvalidRequest(f"task data has no '{key}' field")
            async with self.fetch_slots:
                image = await self.fetcher.fetch(ref, task_id=task_id)
            async with self.detect_slots:
                results = await self.engine.detect(
                    self.info.name,
                    [EncodedImage(image)],
                    self.options,
                    protocol=Door.LABELSTUDIO,
                    request_id=f"{self.request_id}-{task_id}",
                    timeout_s=max(1.0, self.deadline - time.monotonic()),
                )
            return results[0]
        except (InvalidRequest, PayloadTooLarge) as exc:  # this task's image is unusable; the rest go on
            self.failed += 1
            log.warning("label studio task %s: no prediction: %s", task_id, exc.message)
            return None
