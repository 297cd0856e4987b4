"""Management API (port 8081, localhost by default), following TorchServe's shapes where sensible.

Models are loaded by name from the configured model store only: `url=` is accepted for TorchServe
clients but must name a store folder (optionally `NAME.mar`); arbitrary URLs or paths are refused,
so the management port cannot be used to fetch or unpickle remote files.
"""
from __future__ import annotations

import asyncio
import collections
import re
import time

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...engine.api import EngineAPI
from ...errors import Conflict, InvalidRequest, ModelNotFound
from ...types import ModelInfo

router = APIRouter()

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # \Z: "$" also matches before a final newline


def _json(payload, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _engine(request: Request) -> EngineAPI:
    return request.app.state.engine


def describe(info: ModelInfo) -> dict:
    """TorchServe's describe keys (camelCase) plus detserve's own facts."""
    batch = info.batch
    live = sum(1 for w in info.workers if w.state in ("ready", "busy") and w.responsive)
    return {
        "modelName": info.name,
        "modelVersion": info.version,
        "modelUrl": info.name,
        "runtime": "python",
        "minWorkers": len(info.workers),
        "maxWorkers": len(info.workers),
        "batchSize": batch.max_batch_size,
        "maxBatchDelay": batch.max_batch_delay_ms,
        "maxQueueSize": batch.max_queue_size,
        "requestTimeoutMs": batch.request_timeout_ms,
        "loadedAtStartup": True,
        "ready": info.ready,
        "arch": info.arch,
        "backend": info.backend,
        "backendReason": info.backend_reason,
        "inputSize": info.input_size,
        "hasMasks": info.has_masks,
        "defaultScoreThr": info.default_score_thr,
        "maxPerImg": info.max_per_img,  # the cap on a request's max_dets
        "classes": list(info.classes),
        "devices": sorted({w.device for w in info.workers}),
        "liveWorkers": live,
        "workers": [
            {
                "id": str(w.worker_id),
                "pid": w.pid,
                "status": w.state.upper(),
                "device": w.device,
                "gpu": w.device.startswith("cuda"),
                "restarts": w.restarts,
                "inFlight": w.in_flight,
                "responsive": w.responsive,
            }
            for w in info.workers
        ],
        "jobQueueStatus": {
            "remainingCapacity": max(0, batch.max_queue_size - info.queue_depth),
            "pendingRequests": info.queue_depth,
        },
    }


@router.get("/models")
async def list_models(request: Request) -> Response:
    models = [
        {"modelName": i.name, "modelUrl": i.name, "modelVersion": i.version, "ready": i.ready}
        for i in _engine(request).models()
    ]
    return _json({"models": models})


@router.get("/models/{model}")
async def describe_model(request: Request, model: str) -> Response:
    # A list, like TorchServe, which describes every version of a model.
    return _json([describe(_engine(request).model_info(model))])


@router.get("/models/{model}/{version}")
async def describe_model_version(request: Request, model: str, version: str) -> Response:
    return _json([describe(_versioned(request, model, version))])


def _versioned(request: Request, model: str, version: str):
    """The loaded model when `version` names it ("all" names every version); 404 otherwise, as
    TorchServe and the inference routes answer."""
    info = _engine(request).model_info(model)
    if version not in ("all", info.version):
        raise ModelNotFound(f"model {model!r} has no version {version[:100]!r}; loaded: {info.version!r}")
    return info


def _store_name(model_name: str | None, url: str | None) -> str:
    name = model_name
    if name is None and url is not None:
        name = url[:-4] if url.endswith(".mar") else url
    if not name:
        raise InvalidRequest("give model_name=NAME (a folder in the model store)")
    if not _NAME.match(name):
        raise InvalidRequest(f"{name!r} is not a model name: only folders of the model store can be loaded, not URLs or paths")
    return name


@router.post("/models")
async def register_model(
    request: Request,
    model_name: str | None = Query(None),
    url: str | None = Query(None),
    initial_workers: int | None = Query(None, ge=0, le=64),
) -> Response:
    name = _store_name(model_name, url)
    engine = _engine(request)
    if any(i.name == name for i in engine.models()):
        raise Conflict(f"model {name!r} is already loaded; scale it with PUT /models/{name}?min_worker=N")
    info = await engine.load_model(name, workers=initial_workers)
    workers = len(info.workers)
    return _json({"status": f'Model "{name}" Version: {info.version} registered with {workers} initial workers',
                  "model": describe(info)})


@router.delete("/models/{model}")
async def unregister_model(request: Request, model: str) -> Response:
    engine = _engine(request)
    engine.model_info(model)  # 404 for an unknown model
    await engine.unload_model(model)
    return _json({"status": f'Model "{model}" unregistered'})


@router.delete("/models/{model}/{version}")
async def unregister_model_version(request: Request, model: str, version: str) -> Response:
    _versioned(request, model, version)
    return await unregister_model(request, model)


@router.put("/models/{model}")
async def scale_model(
    request: Request,
    model: str,
    min_worker: int | None = Query(None, ge=0, le=64),
    max_worker: int | None = Query(None, ge=0, le=64),
) -> Response:
    """Workers are scaled synchronously: the answer comes once they are started (or stopped)."""
    count = min_worker if min_worker is not None else max_worker
    if count is None:
        raise InvalidRequest("give min_worker=N (the number of worker processes)")
    engine = _engine(request)
    engine.model_info(model)  # 404 for an unknown name before it gets a counter
    calls = getattr(request.app.state, "scale_calls", None)
    if calls is None:
        calls = request.app.state.scale_calls = collections.Counter()
    calls[model] += 1
    call = calls[model]
    info = await engine.scale_workers(model, count)
    # Shrinking retires workers once their current batch is done; wait for that so the answer
    # describes the final state. Past the drain timeout, answer 202 as TorchServe does for async;
    # at once when a later call changed the count, which this one would otherwise wait out.
    deadline = time.monotonic() + request.app.state.settings.drain_timeout_s + 5
    while len(info.workers) != count and time.monotonic() < deadline and calls[model] == call:
        await asyncio.sleep(0.05)
        info = engine.model_info(model)
    status = 200 if len(info.workers) == count else 202
    return _json({"status": f"Workers scaled to {count} for model: {model}", "model": describe(info)}, status)


class BatchUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, le=1024)
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000)
    max_queue_size: int | None = Field(None, ge=1)
    request_timeout_ms: float | None = Field(None, gt=0)


@router.put("/models/{model}/batch")
async def set_batch(request: Request, model: str) -> Response:
    """Batch settings from a JSON body or from query parameters (the body wins)."""
    body = await request.body()
    fields: dict = dict(request.query_params)
    if body.strip():
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"body is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidRequest("body must be a JSON object")
        for key, value in parsed.items():
            # pydantic's lax mode reads true as 1; null would pass as "set" and change nothing
            if value is None or isinstance(value, bool):
                raise InvalidRequest(f"{str(key)[:64]}: must be a number, got {orjson.dumps(value).decode()}")
        fields.update(parsed)
    try:
        update = BatchUpdate(**fields)
    except ValidationError as exc:
        raise InvalidRequest("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    if not update.model_fields_set:
        raise InvalidRequest("nothing to change: give max_batch_size, max_batch_delay_ms, max_queue_size or request_timeout_ms")
    info = await _engine(request).set_batch_settings(model, **update.model_dump(exclude_unset=True))
    return _json({"status": f"Batch settings updated for model: {model}", "model": describe(info)})


# After /models/{model}/batch, which it would otherwise take.
@router.put("/models/{model}/{version}")
async def scale_model_version(
    request: Request,
    model: str,
    version: str,
    min_worker: int | None = Query(None, ge=0, le=64),
    max_worker: int | None = Query(None, ge=0, le=64),
) -> Response:
    _versioned(request, model, version)
    return await scale_model(request, model, min_worker, max_worker)
