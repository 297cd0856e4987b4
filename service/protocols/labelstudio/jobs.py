"""Background pre-annotation jobs: a whole Label Studio project (or a task list, view or filter)
predicted by detserve and written back through Label Studio's predictions API.

Why: "Retrieve Predictions" is one synchronous /predict call that Label Studio abandons after
ML_TIMEOUT_PREDICT (100 s), so projects of more than a few hundred images cannot be pre-annotated
that way. A job has no such limit, survives restarts and reports progress.

How a job runs (`JobRunner._run`):
1. read the project's labelling config from Label Studio and bind it to the model, as /setup does;
2. list the task ids, page by page, into the store (skipped when the job names its tasks);
3. work through the ids (`jobpass.JobPass`, reading, predicting and writing overlapped): read the
   tasks a chunk of `page_size` at a time, skip those that already hold a prediction of this
   model_version (unless `force`), predict the rest exactly as /predict does (`backend.PredictRun`,
   LOW priority in the engine), write the predictions in batches, record each task.
Label Studio down, the engine full or a worker restarting pause the job and retry with backoff;
an unusable image fails only its task. State lives in `jobstore.JobStore`, so a new runner on the
same file resumes unfinished jobs where they stopped.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...engine.api import EngineAPI
from ...errors import (
    DetserveError,
    InvalidRequest,
    JobNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    UpstreamRefused,
)
from ...observability import metrics
from ...settings import LabelStudioJobSettings, ServerSettings
from ...types import ModelInfo, Priority
from .backend import LabelStudioBackend, PredictRun, fetch_config
from .fetch import ImageFetcher
from .jobpass import TRANSIENT, JobPass, Outcome
from .jobstore import JobRecord, JobSpec, JobState, JobStore, TaskState
from .lsapi import LabelStudioAPI
from .outbound import ByteBudget, pinned_client

log = logging.getLogger("detserve.labelstudio.jobs")

MAX_FAILURES_SHOWN = 50
MAX_PENDING_JOBS = 64  # unfinished jobs at once, all models: POST answers 429 beyond
_RATE_WINDOW = 64  # samples the rate is measured over
_PUBLISH_EVERY_S = 1.0  # progress gauge and rate samples, at most this often
# Task ids listed per request: ids only cost Label Studio little (1.23.2 sets no page cap by default), and
# listing 10,000 tasks 100 at a time would hold the first image back ~17 s (0.17 s a page, measured).
# Not 1000: Label Studio 1.23.2 on SQLite answers a page of 1000 with 500 ("Expression tree is too
# large (maximum depth 1000)", found by the 2,000-task acceptance test).
LIST_PAGE_SIZE = 500

T = TypeVar("T")


class JobFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def default_store_path(settings: ServerSettings) -> Path:
    """labelstudio.jobs.store_path, else <cache dir>/labelstudio-jobs.sqlite3 (the cache dir that
    backend = "auto" uses: cache_dir, $DETSERVE_CACHE_DIR, $XDG_CACHE_HOME/detserve, ~/.cache/detserve)."""
    if settings.labelstudio.jobs.store_path is not None:
        return settings.labelstudio.jobs.store_path
    root = settings.cache_dir or os.environ.get("DETSERVE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "detserve"
    return Path(root).expanduser() / "labelstudio-jobs.sqlite3"


class JobRequestBody(BaseModel):
    """POST /labelstudio/{model}/jobs. `task_ids`, `view` and `filters` pick the tasks (at most one
    of them; none: every task of the project); `force` re-predicts tasks that already hold a
    prediction of this model_version (replacing it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    project: int = Field(..., gt=0, le=2**31 - 1)
    task_ids: list[int] | None = Field(None, min_length=1)
    view: int | None = Field(None, gt=0, le=2**31 - 1)
    filters: dict | None = None  # a Data Manager filter: {"conjunction": "and", "items": [...]}
    force: bool = False


def parse_job_request(body: dict, cfg: LabelStudioJobSettings, origin: str = "api") -> JobSpec:
    """A client's job request, checked against the bounds of `cfg`; InvalidRequest / PayloadTooLarge."""
    try:
        parsed = JobRequestBody.model_validate(body)
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidRequest(f"invalid job: {details}") from None
    if sum(x is not None for x in (parsed.task_ids, parsed.view, parsed.filters)) > 1:
        raise InvalidRequest("give at most one of 'task_ids', 'view' and 'filters'")
    if parsed.task_ids is not None:
        if len(parsed.task_ids) > cfg.max_task_ids:
            raise PayloadTooLarge(f"{len(parsed.task_ids)} task ids, over labelstudio.jobs.max_task_ids ({cfg.max_task_ids})")
        if not all(0 < t < 2**63 for t in parsed.task_ids):
            raise InvalidRequest("task ids must be positive integers")
    if parsed.filters is not None:
        try:
            size = len(orjson.dumps(parsed.filters))
        except TypeError:  # orjson's recursion limit: nothing Label Studio would take either
            raise InvalidRequest("'filters' is nested too deeply") from None
        if size > cfg.max_filter_bytes:
            raise PayloadTooLarge(f"'filters' is over labelstudio.jobs.max_filter_bytes ({cfg.max_filter_bytes} bytes)")
    return JobSpec(project=parsed.project, task_ids=tuple(sorted(set(parsed.task_ids))) if parsed.task_ids else None,
                   view=parsed.view, filters=parsed.filters, force=parsed.force, origin=origin)


@dataclass(frozen=True, slots=True)
class JobView:
    """What GET .../jobs/{id} answers."""

    id: str
    model: str
    project: int
    origin: str
    force: bool
    model_version: str
    state: str
    reason: str
    total: int
    done: int
    skipped: int
    failed: int
    pending: int
    listed: bool
    rate_per_s: float | None  # tasks finished per second while running in this process
    eta_s: float | None
    created_at: float
    updated_at: float
    finished_at: float | None
    failures: list[dict]

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(slots=True)
class _Rate:
    """Tasks finished per second over the last few chunks: skips are cheap and would inflate a
    whole-job average, so the window follows what the job is doing now."""

    samples: list[tuple[float, int]]

    def add(self, now: float, finished: int) -> None:
        self.samples.append((now, finished))
        del self.samples[:-_RATE_WINDOW]

    def per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


class _JobContext:
    """What one run of a job holds: the Label Studio client, the bound config, the predictor."""

    def __init__(self, api: LabelStudioAPI, predictor: PredictRun, info: ModelInfo):
        self.api = api
        self.predictor = predictor
        self.info = info
        self.fetch_tries: dict[int, int] = {}  # task id -> transient fetch failures in this run


class JobRunner:
    """Owns the jobs of one server (or one `detserve annotate`): creates, runs, resumes, cancels.

    `sleep` and `clock` are injectable so tests drive the backoff without waiting for it."""

    def __init__(self, engine: EngineAPI, settings: ServerSettings, store: JobStore,
                 backend: LabelStudioBackend | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.settings = settings
        self.cfg: LabelStudioJobSettings = settings.labelstudio.jobs
        self.store = store
        self.backend = backend or LabelStudioBackend(settings.labelstudio)
        self.sleep = sleep
        self.clock = clock
        self._running = asyncio.Semaphore(self.cfg.max_running_jobs)
        self._ls_slots = asyncio.Semaphore(self.cfg.max_ls_requests)
        self._tasks: dict[str, asyncio.Task] = {}
        self._rates: dict[str, _Rate] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Resume every unfinished job of the store; returns how many."""
        jobs = self.store.unfinished()
        for job in jobs:
            log.info("resuming label studio job %s (%s, project %d, %s)", job.id, job.model, job.spec.project, job.state.value)
            self._launch(job.id)
        return len(jobs)

    async def stop(self) -> None:
        """Stop running jobs where they are; their state stays in the store for the next start."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def wait(self, job_id: str) -> JobView:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return self.view(self._record(job_id))

    # -- API ---------------------------------------------------------------------------------

    def submit(self, model: str, spec: JobSpec) -> JobView:
        info = self.engine.model_info(model)  # ModelNotFound for an unknown model
        if not info.version:
            raise ModelNotReady(f"model '{model}' is not ready yet")
        if len(self.store.unfinished()) >= MAX_PENDING_JOBS:
            raise Overloaded(f"{MAX_PENDING_JOBS} jobs are already queued or running; retry when some finish",
                             retry_after_s=60)
        if not fetch_config(self.settings).url:
            raise InvalidRequest("jobs need labelstudio.url (or LABEL_STUDIO_URL) and an API key to read tasks from")
        job_id = uuid.uuid4().hex[:16]
        record = self.store.create(job_id, model, spec, info.version)
        self.store.prune(self.cfg.max_jobs_kept)
        metrics.LS_JOBS_STARTED.labels(model, spec.origin).inc()
        log.info("label studio job %s queued: model %s, project %d, %s tasks, force=%s", job_id, model, spec.project,
                 len(spec.task_ids) if spec.task_ids is not None else "all", spec.force)
        self._launch(job_id)
        return self.view(record)

    def get(self, model: str, job_id: str) -> JobView:
        record = self._record(job_id)
        if record.model != model:
            raise JobNotFound(f"no job {job_id!r} for model {model!r}")
        return self.view(record)

    def list(self, model: str, limit: int = 100) -> list[JobView]:
        return [self.view(r, failures=False) for r in self.store.list(model, limit)]

    async def cancel(self, model: str, job_id: str) -> JobView:
        record = self._record(job_id)
        if record.model != model:
            raise JobNotFound(f"no job {job_id!r} for model {model!r}")
        if not record.state.finished:
            self.store.set_state(job_id, JobState.CANCELLED, "cancelled by a client")
            task = self._tasks.get(job_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            metrics.LS_JOBS_FINISHED.labels(model, JobState.CANCELLED.value).inc()
            self._publish(model)
        return self.view(self._record(job_id))

    def view(self, record: JobRecord, *, failures: bool = True) -> JobView:
        counts = record.counts
        rate = self._rates.get(record.id)
        per_s = rate.per_s() if rate and not record.state.finished else None
        eta = record.remaining / per_s if per_s and record.listed else None
        shown = self.store.failures(record.id, MAX_FAILURES_SHOWN) if failures else []
        return JobView(
            id=record.id, model=record.model, project=record.spec.project, origin=record.spec.origin,
            force=record.spec.force, model_version=record.model_version, state=record.state.value,
            reason=record.reason, total=record.total, done=counts.get(TaskState.DONE, 0),
            skipped=counts.get(TaskState.SKIPPED, 0), failed=counts.get(TaskState.FAILED, 0),
            pending=record.remaining, listed=record.listed,
            rate_per_s=round(per_s, 3) if per_s is not None else None,
            eta_s=round(eta, 1) if eta is not None else None, created_at=record.created_at,
            updated_at=record.updated_at, finished_at=record.finished_at,
            failures=[{"task": t, "reason": r} for t, r in shown],
        )

    # -- running -----------------------------------------------------------------------------

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(f"no job {job_id!r}")
        return record

    def _launch(self, job_id: str) -> None:
        if self._closed or job_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"ls-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t, j=job_id: self._tasks.pop(j, None))

    async def _run(self, job_id: str) -> None:
        async with self._running:
            job = self._record(job_id)
            if job.state.finished:
                return
            self._rates[job_id] = _Rate([])
            try:
                async with self._context(job) as ctx:
                    await self._list(job, ctx)
                    await self._work(job, ctx)
                self._finish(job, JobState.DONE, "")
            except JobFailed as exc:
                self._finish(job, JobState.FAILED, exc.reason)
            except asyncio.CancelledError:
                raise  # cancel() has recorded it; stop() leaves the state for the next start
            except Exception as exc:  # a bug must not leave the job "running" forever
                log.exception("label studio job %s crashed", job_id)
                self._finish(job, JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self._rates.pop(job_id, None)
                self._publish(job.model)

    def _finish(self, job: JobRecord, state: JobState, reason: str) -> None:
        if self._record(job.id).state is JobState.CANCELLED:
            return
        self.store.set_state(job.id, state, reason)
        metrics.LS_JOBS_FINISHED.labels(job.model, state.value).inc()
        record = self._record(job.id)
        log.info("label studio job %s %s: %d done, %d skipped, %d failed%s", job.id, state.value,
                 record.counts.get(TaskState.DONE, 0), record.counts.get(TaskState.SKIPPED, 0),
                 record.counts.get(TaskState.FAILED, 0), f" ({reason})" if reason else "")

    @contextlib.asynccontextmanager
    async def _context(self, job: JobRecord):
        # Only jobs read Label Studio's upload folder: /predict keeps fetching through Label Studio.
        config = dataclasses.replace(fetch_config(self.settings), upload_root=self.settings.labelstudio.upload_root)
        async with pinned_client(verify=config.verify_ssl, timeout_s=config.timeout_s) as client:
            budget = ByteBudget(self.settings.labelstudio.max_call_bytes)
            fetcher = ImageFetcher(config, client, self.backend.tokens, budgets=(budget, self.backend.image_bytes))
            api = LabelStudioAPI(fetcher, self._ls_slots)
            project = await self._retrying(job, lambda: api.project(job.spec.project))
            label_config = project.get("label_config")
            info = self.engine.model_info(job.model)
            if info.version != job.model_version:
                raise JobFailed(f"model {job.model!r} is now version {info.version!r}, the job was for "
                                f"{job.model_version!r}: start a new job")
            if not isinstance(label_config, str) or not label_config.strip():
                raise JobFailed(f"Label Studio project {job.spec.project} has no labelling config")
            try:
                controls = self.backend.bind(info, label_config)
            except DetserveError as exc:
                raise JobFailed(f"project {job.spec.project}'s labelling config does not fit the model: {exc.message}") from None
            predictor = PredictRun(
                self.engine, info, controls, fetcher, f"job-{job.id}", self.settings.labelstudio.max_concurrent_fetches,
                max_in_flight=self.cfg.max_in_flight, priority=Priority.LOW,
                image_timeout_s=info.batch.request_timeout_ms / 1000, strict=True,
                max_answer_bytes=self.settings.labelstudio.max_answer_bytes,
            )
            yield _JobContext(api, predictor, info)

    async def _retrying(self, job: JobRecord, call: Callable[[], Awaitable[T]],
                        progress: Callable[[], int] | None = None) -> T:
        """`call()`, retried with doubling waits while the failure is transient; the job shows
        "paused" with the reason meanwhile, and fails once it has been down `give_up_after_s`.
        With `progress` (tasks finished so far), a call that got further than the last one starts
        the waiting over: a long job with a hiccup now and then is not "down" for an hour."""
        delay, first_failure = self.cfg.retry_initial_s, None
        reached = progress() if progress else 0
        while True:
            try:
                result = await call()
            except TRANSIENT as exc:
                now = self.clock()
                if progress is not None and (now_reached := progress()) > reached:
                    reached, delay, first_failure = now_reached, self.cfg.retry_initial_s, None
                first_failure = now if first_failure is None else first_failure
                if now - first_failure >= self.cfg.give_up_after_s:
                    raise JobFailed(f"gave up after {now - first_failure:.0f} s: {exc.message}") from None
                self._set_state(job, JobState.PAUSED, f"{exc.message}; retrying in {delay:.1f} s")
                log.warning("label studio job %s paused: %s; retrying in %.1f s", job.id, exc.message, delay)
                await self.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_max_s)
                # Back to work: the state says so while the retry runs (a pass may run for hours).
                self._set_state(job, JobState.LISTING if not job.listed else JobState.RUNNING, "")
                continue
            except UpstreamRefused as exc:
                raise JobFailed(exc.message) from None
            return result

    def _set_state(self, job: JobRecord, state: JobState, reason: str) -> None:
        if job.state is not state or job.reason != reason:
            job.state, job.reason = state, reason
            self.store.set_state(job.id, state, reason)

    async def _list(self, job: JobRecord, ctx: _JobContext) -> None:
        if job.listed:
            return
        self._set_state(job, JobState.LISTING, "")
        page, size, seen = job.next_page, LIST_PAGE_SIZE, job.total
        while True:
            result = await self._retrying(job, lambda: ctx.api.task_ids(
                job.spec.project, page, size, view=job.spec.view, filters=job.spec.filters))
            seen += len(result.ids)
            # Not "a short page": a Label Studio with TASK_API_PAGE_SIZE_MAX below LIST_PAGE_SIZE
            # answers short pages all the way; the total (or an empty page) says where it ends.
            last = not result.ids or seen >= result.total or seen >= self.cfg.max_task_ids
            self.store.add_page(job.id, result.ids[: max(0, self.cfg.max_task_ids - (seen - len(result.ids)))],
                                page + 1, last)
            if last:
                break
            page += 1
        job.listed = True
        self._publish(job.model)

    async def _work(self, job: JobRecord, ctx: _JobContext) -> None:
        self._set_state(job, JobState.RUNNING, "")

        def one_pass() -> Awaitable[None]:
            return JobPass(job, self.store, ctx.api, ctx.predictor, page_size=self.cfg.page_size,
                           write_batch=self.cfg.write_batch, fetch_tries=ctx.fetch_tries,
                           record=lambda outcomes: self._record_outcomes(job, outcomes)).run()

        await self._retrying(job, one_pass, progress=lambda: self._finished(job))

    def _finished(self, job: JobRecord) -> int:
        return sum(n for s, n in self.store.counts(job.id).items() if s not in (TaskState.PENDING, TaskState.WRITING))

    def _record_outcomes(self, job: JobRecord, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        self._count(job.model, outcomes)
        self.store.mark(job.id, outcomes)
        if any(state is not TaskState.WRITING for _, state, _, _ in outcomes):
            now = self.clock()
            rate = self._rates.get(job.id)
            if rate is not None and (not rate.samples or now - rate.samples[-1][0] >= _PUBLISH_EVERY_S):
                rate.add(now, self._finished(job))
                self._publish(job.model)

    # -- metrics -----------------------------------------------------------------------------

    @staticmethod
    def _count(model: str, outcomes) -> None:
        for _, state, _, _ in outcomes:
            if state is not TaskState.WRITING:
                metrics.LS_JOB_TASKS.labels(model, state.value).inc()

    def _publish(self, model: str) -> None:
        """The progress gauge: finished share of the tasks of the model's unfinished jobs."""
        jobs = [j for j in self.store.unfinished() if j.model == model]
        total = sum(j.total for j in jobs)
        remaining = sum(j.remaining for j in jobs)
        metrics.LS_JOBS_ACTIVE.labels(model).set(len(jobs))
        metrics.LS_JOB_PROGRESS.labels(model).set((total - remaining) / total if total else 1.0 if not jobs else 0.0)
