"""Label Studio ML backend routes: each model is one backend URL, `/labelstudio/{model}`.

Label Studio calls /health, /setup, /predict, /webhook and /versions under that URL; shapes
follow Label Studio 1.23.2 and the 2.x label-studio-ml library. The work is done by
`service.protocols.labelstudio.backend.LabelStudioBackend`.

Background pre-annotation jobs live under the same prefix (`/jobs`, same auth) and are run by
`service.protocols.labelstudio.jobs.JobRunner`; a TASKS_CREATED webhook queues one for projects
listed in labelstudio.jobs.on_import_projects.

Auth: Label Studio speaks only HTTP Basic to ML backends, so these routes are exempt from the
server's bearer check and ask for Basic auth instead. When bearer tokens are on and Basic auth is
not configured, they ask for a bearer token like every other route (which Label Studio cannot
send, so the 401 says how to configure Basic auth), unless `labelstudio.allow_unauthenticated`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse

from ...engine.dataplane import dataplane_for
from ...errors import (ClientClosedRequest, DetserveError, InvalidRequest, ModelNotReady, PayloadTooLarge,
                       Unauthenticated, http_status)
from ...types import Protocol as Door
from ..labelstudio.backend import LabelStudioBackend, basic_auth_credentials
from ..labelstudio.jobs import JobRunner, default_store_path, parse_job_request
from ..labelstudio.jobstore import JobSpec, JobStore

log = logging.getLogger("detserve.labelstudio")
T = TypeVar("T")

NO_BASIC_AUTH_HINT = (
    "bearer tokens are on (auth.inference_tokens) and Label Studio cannot send them: set "
    "labelstudio.basic_auth_user/basic_auth_pass (or BASIC_AUTH_USER/BASIC_AUTH_PASS) and the same pair "
    "in the Label Studio backend's Basic auth, or set labelstudio.allow_unauthenticated=true to leave "
    "these routes open"
)


def _backend(request: Request) -> LabelStudioBackend:
    backend = getattr(request.app.state, "labelstudio_backend", None)
    if backend is None:
        settings = request.app.state.settings.labelstudio
        backend = request.app.state.labelstudio_backend = LabelStudioBackend(settings)
    return backend


def _bearer_tokens_on(request: Request) -> bool:
    auth = getattr(request.app.state, "auth", None)
    return auth is not None and auth.enabled("inference")


def require_label_studio_auth(request: Request) -> None:
    """HTTP Basic auth when a user is configured (Label Studio's BASIC_AUTH option); otherwise the
    server's bearer tokens when those are on, so no route runs inference or fetches without credentials."""
    settings = request.app.state.settings
    expected = basic_auth_credentials(settings)
    if expected is None:
        if settings.labelstudio.allow_unauthenticated or not _bearer_tokens_on(request):
            return
        try:
            request.app.state.auth.check("inference", request.headers.get("authorization"))
        except Unauthenticated as exc:
            if not getattr(request.app.state, "labelstudio_refusal_logged", False):
                request.app.state.labelstudio_refusal_logged = True  # once: Label Studio retries often
                log.warning("refusing /labelstudio requests without credentials: %s", NO_BASIC_AUTH_HINT)
            raise Unauthenticated(f"{exc.message}; {NO_BASIC_AUTH_HINT}") from None
        return
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    user = password = ""
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except ValueError:  # bad base64, a non-ASCII header value, or not UTF-8 inside: no credentials
            pass
    ok_user = hmac.compare_digest(user.encode(), expected[0].encode())
    ok_pass = hmac.compare_digest(password.encode(), expected[1].encode())
    if not (ok_user and ok_pass):
        raise HTTPException(
            status_code=401,
            detail="Label Studio backend needs HTTP Basic auth: set the backend's Basic auth user and password",
            headers={"WWW-Authenticate": 'Basic realm="detserve label studio"'},
        )


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


router = APIRouter(prefix="/labelstudio/{model}", tags=["labelstudio"], dependencies=[Depends(require_label_studio_auth)])


@router.get("/health")
@router.get("/")
async def health(model: str, request: Request) -> dict:
    return _backend(request).health(_engine(request), model)


@router.post("/setup")
async def setup(model: str, request: Request) -> dict:
    return _backend(request).setup(_engine(request), model, await _json_body(request))


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, stopped when the client hangs up first: Label Studio gives up on a slow /predict and
    retries it later, and the abandoned call's fetches and detections must not run on meanwhile."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the body is read already; nothing else arrives but the disconnect
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientClosedRequest("the client closed the connection before /predict finished") from None
        raise
    finally:
        watcher.cancel()


@router.post("/predict")
async def predict(model: str, request: Request) -> dict:
    started = time.perf_counter()
    code = 500
    try:
        body = await _json_body(request)
        result = await _unless_disconnected(
            request, _backend(request).predict(_engine(request), request.app.state.settings, model, body))
        code = 200
        return result
    except DetserveError as err:
        code = http_status(err)
        raise
    finally:
        dataplane_for(request.app.state).record(model, Door.LABELSTUDIO.value, code, time.perf_counter() - started)


def _engine(request: Request):
    """The engine, once the data plane (the one readiness source) says the server has started; as
    on every door, a request that reaches the app while draining still runs (the listeners stop
    taking new connections), and per-model readiness (live workers) is checked by the backend."""
    dp = dataplane_for(request.app.state)
    if dp.starting or not dp.live():
        raise ModelNotReady("the server is starting or stopping; retry shortly")
    return dp.engine


@router.post("/webhook")
async def webhook(model: str, request: Request) -> JSONResponse:
    engine = _engine(request)
    engine.model_info(model)  # 404 for an unknown model
    body = await _json_body(request)
    if body.get("action") == "TASKS_CREATED":
        queued = await _on_import(request, engine, model, body)
        if queued is not None:
            return JSONResponse({"status": "ok", "job": queued}, status_code=201)
    status, answer = LabelStudioBackend.webhook(body)
    return JSONResponse(answer, status_code=status)


async def _on_import(request: Request, engine, model: str, body: dict) -> str | None:
    """A job for the tasks just imported, when their project opted in; None otherwise."""
    cfg = request.app.state.settings.labelstudio.jobs
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else project
    if isinstance(project_id, bool) or not isinstance(project_id, int) or project_id not in cfg.on_import_projects:
        return None
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise InvalidRequest("TASKS_CREATED needs 'tasks': a non-empty list of task objects")
    if len(tasks) > cfg.max_task_ids:
        raise PayloadTooLarge(f"{len(tasks)} tasks, over labelstudio.jobs.max_task_ids ({cfg.max_task_ids})")
    ids = [t.get("id") if isinstance(t, dict) else None for t in tasks]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
        raise InvalidRequest("every task of TASKS_CREATED needs a positive integer 'id' below 2**63")
    runner = await _jobs(request)
    view = runner.submit(model, JobSpec(project=project_id, task_ids=tuple(sorted(set(ids))), origin="on_import"))
    return view.id


# ---- background jobs ------------------------------------------------------------------------

JOB_ID = Path(..., pattern=r"^[0-9a-f]{16}$", description="a job id as POST .../jobs returned it")
MAX_JOBS_LISTED = 100


def _job_spec(body: dict, request: Request) -> JobSpec:
    return parse_job_request(body, request.app.state.settings.labelstudio.jobs)


async def _jobs(request: Request) -> JobRunner:
    """The app's job runner, made (and its unfinished jobs resumed) on first use when the server
    did not start it already (`start_jobs`)."""
    app = request.app
    lock = app.state.__dict__.setdefault("labelstudio_jobs_lock", asyncio.Lock())
    async with lock:
        runner = getattr(app.state, "labelstudio_jobs", None)
        if runner is None:
            runner = await start_jobs(app)
    return runner


async def start_jobs(app, *, only_if_stored: bool = False) -> JobRunner | None:
    """Open the job store and resume its unfinished jobs; the server calls this once the engine is up,
    with `only_if_stored` (no store file yet: nothing to resume, and none is made until a job is)."""
    settings = app.state.settings
    if only_if_stored and not default_store_path(settings).exists():
        return None
    if getattr(app.state, "labelstudio_backend", None) is None:
        app.state.labelstudio_backend = LabelStudioBackend(settings.labelstudio)
    store = JobStore(default_store_path(settings))
    runner = JobRunner(app.state.engine, settings, store, app.state.labelstudio_backend)
    app.state.labelstudio_jobs = runner
    resumed = await runner.start()
    if resumed:
        log.info("resumed %d label studio job(s) from %s", resumed, store.path)
    return runner


async def stop_jobs(app) -> None:
    """Stop running jobs where they are (the store keeps them for the next start)."""
    runner = getattr(app.state, "labelstudio_jobs", None)
    if runner is not None:
        await runner.stop()
        runner.store.close()
        app.state.labelstudio_jobs = None


@router.post("/jobs", status_code=201)
async def create_job(model: str, request: Request) -> dict:
    engine = _engine(request)
    spec = _job_spec(await _json_body(request), request)
    engine.model_info(model)  # 404 for an unknown model before anything is stored
    return (await _jobs(request)).submit(model, spec).to_json()


@router.get("/jobs")
async def list_jobs(model: str, request: Request) -> dict:
    _engine(request).model_info(model)
    return {"jobs": [v.to_json() for v in (await _jobs(request)).list(model, MAX_JOBS_LISTED)]}


@router.get("/jobs/{job_id}")
async def get_job(model: str, request: Request, job_id: str = JOB_ID) -> dict:
    return (await _jobs(request)).get(model, job_id).to_json()


@router.delete("/jobs/{job_id}")
async def cancel_job(model: str, request: Request, job_id: str = JOB_ID) -> dict:
    return (await (await _jobs(request)).cancel(model, job_id)).to_json()


@router.get("/versions")
@router.post("/versions")  # label-studio-ml 1.0.9 served POST
async def versions(model: str, request: Request) -> dict:
    return _backend(request).versions(_engine(request), model)


@router.get("/metrics")
async def metrics(model: str) -> dict:
    return {}
