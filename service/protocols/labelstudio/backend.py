"""The Label Studio ML backend behaviour behind `/labelstudio/{model}/...`, independent of FastAPI.

One instance per app holds what must outlive a request: access tokens obtained from personal
access tokens, and what each project's /setup call told us (its config, LS host and token).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ...engine.api import EngineAPI
from ...errors import DeadlineExceeded, DetserveError, InvalidRequest, ModelNotReady, PayloadTooLarge
from ...settings import LabelStudioSettings, ServerSettings
from ...types import DetectResult, EncodedImage, ModelInfo, Priority
from ...types import Protocol as Door
from .config import BoundControl, ConfigInvalid, ControlTag, bind_controls, detect_options, parse_label_config
from .fetch import FetchConfig, ImageFetcher, TokenCache
from .outbound import ByteBudget, FetchUnavailable, pinned_client, without_userinfo
from .results import AnswerBudget, task_prediction

log = logging.getLogger("detserve.labelstudio")

TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
UNDEFINED_KEY = "$undefined$"  # LS's data key for tasks imported without a column name
MAX_PROJECT_KEY_CHARS = 200  # LS sends "<id>.<created_ts>"
MAX_SETUP_FIELD_CHARS = 4096  # hostname, access_token
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


def _without_userinfo(url: str | None) -> str | None:
    """`url` less any user:password@. labelstudio.url refuses them at start-up; from the
    environment or a /setup hostname they are dropped instead: httpx would send them as Basic auth
    in place of the token, and the URL reaches logs."""
    stripped = without_userinfo(url) if url else url
    if stripped != url and not _USERINFO_WARNED:
        _USERINFO_WARNED.append(True)
        log.warning("ignoring user:password@ in the Label Studio URL: give its token as LABEL_STUDIO_API_KEY")
    return stripped


_USERINFO_WARNED: list[bool] = []  # once per process: the URL is read on every call


def fetch_config(settings: ServerSettings, setup: ProjectSetup | None = None) -> FetchConfig:
    """Where task images come from and with which credentials.

    The configured API key goes only to the configured URL. A /setup `hostname` was chosen by the
    caller of /setup: it is used only when no URL is configured and `allow_setup_hostname` is set,
    and then only with the token that same caller sent."""
    ls = settings.labelstudio
    url = ls.url or _without_userinfo(_env("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"))
    api_key = ls.api_key or _env("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")
    trusted = True
    if url:
        # The caller's own token, to the configured address only.
        api_key = api_key or (setup.access_token if setup else None)
    elif ls.allow_setup_hostname and setup and setup.hostname:
        url, api_key, trusted = _without_userinfo(setup.hostname), setup.access_token, False
    else:
        api_key = None  # nowhere it may go
    root = ls.document_root or _env("LOCAL_FILES_DOCUMENT_ROOT")
    return FetchConfig(
        url=url.rstrip("/") if url else None,
        api_key=api_key,
        document_root=Path(root) if root else None,
        timeout_s=ls.fetch_timeout_s,
        max_bytes=ls.max_image_bytes,
        verify_ssl=(_env("VERIFY_SSL") or "true").lower() not in ("false", "0", "no"),
        url_trusted=trusted,
        allow=tuple(ls.fetch_allow),
        max_redirects=ls.fetch_max_redirects,
    )


def _optional_str(body: dict, field: str, limit: int) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field}' must be a string or null, got {type(value).__name__}")
    if len(value) > limit:
        raise PayloadTooLarge(f"'{field}' is {len(value)} characters, over the {limit}-character limit")
    return value


def _project_key(body: dict) -> str | None:
    project = body.get("project")
    if project is None:
        return None
    if isinstance(project, bool) or not isinstance(project, (str, int)):
        raise InvalidRequest(f"'project' must be a string or an integer, got {type(project).__name__}")
    key = str(project)
    if len(key) > MAX_PROJECT_KEY_CHARS:
        raise InvalidRequest(f"'project' is over {MAX_PROJECT_KEY_CHARS} characters")
    return key


class _LRU(OrderedDict):
    """A dict that forgets its least recently used entries beyond `max_entries`."""

    def __init__(self, max_entries: int):
        super().__init__()
        self.max_entries = max_entries

    def get_recent(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)


class LabelStudioBackend:
    """State that outlives a request: PAT access tokens, /setup configs (bounded), parsed configs
    (bounded the same way), and the server-wide budget of fetched image bytes."""

    def __init__(self, settings: LabelStudioSettings | None = None) -> None:
        self.settings = settings or LabelStudioSettings()
        self.tokens = TokenCache()
        self._projects: _LRU = _LRU(self.settings.max_projects)
        self._parsed: _LRU = _LRU(self.settings.max_projects)  # sha256 of a config -> its control tags
        self.image_bytes = ByteBudget(self.settings.max_inflight_bytes)

    @property
    def stored_configs(self) -> tuple[int, int]:
        """(project setups remembered, parsed configs cached): both at most labelstudio.max_projects."""
        return len(self._projects), len(self._parsed)

    # -- endpoints -------------------------------------------------------------------------

    def health(self, engine: EngineAPI, model: str) -> dict:
        info = self._ready_info(engine, model)
        return {"status": "UP", "model_class": "detserve", "model": model, "model_version": info.version}

    def setup(self, engine: EngineAPI, model: str, body: dict) -> dict:
        info = self._ready_info(engine, model)
        schema = self._label_config(body, "schema")
        project = _project_key(body)
        hostname = _optional_str(body, "hostname", MAX_SETUP_FIELD_CHARS)
        access_token = _optional_str(body, "access_token", MAX_SETUP_FIELD_CHARS)
        if schema:
            self.bind(info, schema)  # a config the model cannot fill fails the connection, with the reason
        if project is not None:
            self._projects.put(project, ProjectSetup(label_config=schema, hostname=hostname, access_token=access_token))
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
        tasks = self._tasks(body)
        project = _project_key(body)
        setup = self._projects.get_recent(project) if project else None
        label_config = self._label_config(body, "label_config") or (setup.label_config if setup else None)
        if not label_config:
            raise ConfigInvalid("/predict needs 'label_config' (or an earlier /setup for this project)")
        controls = self.bind(info, label_config)
        config = fetch_config(settings, setup)
        request_id = uuid.uuid4().hex[:12]
        async with pinned_client(verify=config.verify_ssl, timeout_s=config.timeout_s) as client:
            call_bytes = ByteBudget(self.settings.max_call_bytes)
            fetcher = ImageFetcher(config, client, self.tokens, budgets=(call_bytes, self.image_bytes))
            run = PredictRun(engine, info, controls, fetcher, request_id, self.settings.max_concurrent_fetches,
                             max_answer_bytes=self.settings.max_answer_bytes)
            predictions = await run.all(tasks)
        log.info(
            "label studio predict %s: model %s, %d tasks, %d without an image, %.2f s, peak %d image bytes held",
            request_id, model, len(tasks), run.failed, time.perf_counter() - started, call_bytes.peak,
        )
        return {"results": predictions}

    # -- helpers ---------------------------------------------------------------------------

    def _tasks(self, body: dict) -> list[dict]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise InvalidRequest("/predict body needs 'tasks': a list of task objects")
        if len(tasks) > self.settings.max_tasks:
            raise PayloadTooLarge(
                f"/predict has {len(tasks)} tasks, over labelstudio.max_tasks ({self.settings.max_tasks}); "
                "select fewer tasks per 'Retrieve Predictions'"
            )
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise InvalidRequest(f"tasks[{i}] must be a task object, got {type(task).__name__}")
            if not isinstance(task.get("data", {}), dict):
                raise InvalidRequest(f"tasks[{i}].data must be an object, got {type(task['data']).__name__}")
            task_id = task.get("id")
            if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, (int, str))
                                        or len(str(task_id)) > MAX_PROJECT_KEY_CHARS):
                raise InvalidRequest(f"tasks[{i}].id must be an integer or a short string")
        return tasks

    def _label_config(self, body: dict, field: str) -> str | None:
        value = body.get(field)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigInvalid(f"'{field}' must be the labelling config as an XML string, got {type(value).__name__}")
        limit = self.settings.max_label_config_bytes
        if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
            raise PayloadTooLarge(f"'{field}' is over labelstudio.max_label_config_bytes ({limit} bytes)")
        return value

    @staticmethod
    def _ready_info(engine: EngineAPI, model: str) -> ModelInfo:
        info = engine.model_info(model)  # raises ModelNotFound
        if not info.ready or not info.version:
            raise ModelNotReady(f"model '{model}' is not ready yet")
        return info

    def _parse(self, label_config: str) -> tuple[ControlTag, ...]:
        key = hashlib.sha256(label_config.encode("utf-8", "surrogatepass")).digest()
        controls = self._parsed.get_recent(key)
        if controls is None:
            controls = parse_label_config(label_config)
            self._parsed.put(key, controls)
        return controls

    def bind(self, info: ModelInfo, label_config: str) -> list[BoundControl]:
        return bind_controls(
            self._parse(label_config),
            model=info.name,
            classes=tuple(info.classes),
            has_masks=info.has_masks,
            default_score_thr=info.default_score_thr,
        )


class TaskFailed(Exception):
    """One task cannot be predicted (no image, image unusable); `reason` says why. `transient`:
    its image host timed out or was down, so the same task may work on a later try."""

    def __init__(self, reason: str, *, transient: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class PredictRun:
    """One /predict call: tasks' images fetched and detected concurrently, so the engine's scheduler
    sees many at once and batches them. A fixed set of runners walks the task list, so a call of
    10,000 tasks holds a bounded number of coroutines, connections and images.

    Background jobs use the same conversion through `one()` with `strict=True` (an unusable image
    raises TaskFailed instead of giving an empty prediction), LOW priority, a per-image deadline
    and their own bound on images in the engine."""

    def __init__(self, engine: EngineAPI, info: ModelInfo, controls: list[BoundControl], fetcher: ImageFetcher,
                 request_id: str, max_concurrent_fetches: int, *, max_in_flight: int | None = None,
                 priority: Priority = Priority.NORMAL, image_timeout_s: float | None = None, strict: bool = False,
                 max_answer_bytes: int):
        self.engine = engine
        self.info = info
        self.controls = controls
        self.fetcher = fetcher
        self.request_id = request_id
        self.failed = 0
        # No class filter here: the regions stay exactly what /predictions returns for the image.
        self.options = detect_options(controls)
        self.deadline_s = max(PREDICT_DEADLINE_S, info.batch.request_timeout_ms / 1000)
        self.deadline = time.monotonic() + self.deadline_s
        # Only background work names a priority: engines that predate priorities still serve /predict.
        self._priority = {"priority": priority} if priority is not Priority.NORMAL else {}
        self.image_timeout_s = image_timeout_s
        self.strict = strict
        # A /predict answer is built whole before it is sent: one budget for the call, which must
        # also end by its deadline. Jobs write task by task: a budget per task (see `one`).
        self.max_answer_bytes = max_answer_bytes
        self.answer = AnswerBudget(max_answer_bytes, self.deadline if image_timeout_s is None else None, self.deadline_s)
        self.fetch_slots = asyncio.Semaphore(max_concurrent_fetches)
        detect_slots = max(1, info.batch.max_queue_size // 2)  # room for other traffic
        if max_in_flight is not None:
            detect_slots = max(1, min(detect_slots, max_in_flight))
        self.detect_slots = asyncio.Semaphore(detect_slots)
        self.runners = detect_slots + max_concurrent_fetches  # enough to keep both kinds of slot busy
        self.by_image: dict[str, list[BoundControl]] = {}
        for control in controls:
            self.by_image.setdefault(control.tag.image_key, []).append(control)

    async def all(self, tasks: list[dict]) -> list[dict]:
        results: list[dict | None] = [None] * len(tasks)
        pending = iter(range(len(tasks)))

        async def runner() -> None:
            for i in pending:  # one shared iterator: each task is taken by exactly one runner
                results[i] = await self.one(tasks[i])

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.runners, len(tasks))):
                    group.create_task(runner())
        except* DetserveError as grouped:
            raise grouped.exceptions[0] from None  # engine trouble fails the call: LS retries it later
        return results

    async def one(self, task: dict) -> dict:
        task_id = task.get("id")
        data = task.get("data") or {}
        regions, scores = [], []
        budget = AnswerBudget(self.max_answer_bytes) if self.strict else self.answer
        for key, controls in self.by_image.items():
            ref = data.get(key, data.get(UNDEFINED_KEY))
            try:
                item = await self._predict_image(task_id, ref, key, controls, budget)
            except PayloadTooLarge as exc:
                if not self.strict:
                    raise  # the call's answer is full: 413 for the call
                raise TaskFailed(exc.message) from None  # one task too large for a job: that task fails
            regions.extend(item["result"])
            scores.extend(r["score"] for r in item["result"])
        score = round(sum(scores) / len(scores), 5) if scores else 0.0
        return {"result": regions, "score": score, "model_version": self.info.version}

    async def _predict_image(self, task_id, ref, key: str, controls: list[BoundControl], budget: AnswerBudget) -> dict:
        result = await self._detect(task_id, ref, key)
        if result is not None and any(c.tag.kind.needs_masks for c in controls):
            # Mask decoding and contour/RLE encoding cost milliseconds per region: keep them off
            # the event loop that serves every other request.
            return await asyncio.to_thread(task_prediction, result, controls, self.info.version, budget)
        return task_prediction(result, controls, self.info.version, budget)

    async def _detect(self, task_id, ref, key: str) -> DetectResult | None:
        if self.image_timeout_s is None and time.monotonic() >= self.deadline:
            # The call as a whole is over its deadline: fail it (504), do not start another image.
            raise DeadlineExceeded(f"/predict {self.request_id} ran past its {self.deadline_s:.0f} s deadline; "
                                   "select fewer tasks per 'Retrieve Predictions'")
        try:
            if ref is None:
                raise InvalidRequest(f"task data has no '{key}' field")
            async with contextlib.AsyncExitStack() as stack:
                async with self.fetch_slots:
                    image = await stack.enter_async_context(self.fetcher.holding(ref, task_id=task_id))
                async with self.detect_slots:  # the image's bytes stay counted until detect returns
                    results = await self.engine.detect(
                        self.info.name,
                        [EncodedImage(image)],
                        self.options,
                        protocol=Door.LABELSTUDIO,
                        request_id=f"{self.request_id}-{str(task_id)[:40]}",
                        timeout_s=self.image_timeout_s or max(0.001, self.deadline - time.monotonic()),
                        **self._priority,
                    )
            return results[0]
        except (InvalidRequest, PayloadTooLarge) as exc:  # this task's image is unusable; the rest go on
            self.failed += 1
            if self.strict:
                raise TaskFailed(exc.message, transient=isinstance(exc, FetchUnavailable)) from None
            log.warning("label studio task %s: no prediction: %s", str(task_id)[:40], exc.message)
            return None
