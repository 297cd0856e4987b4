"""One pass of a pre-annotation job over its unfinished tasks: read, predict and write overlapped.

Why a pipeline: done one chunk at a time (read 100 tasks, predict them, write them, then the next
chunk) the engine idles while a chunk's tail finishes, while its predictions are written and while
the next chunk is read. Here three stages run at once, joined by small bounded queues:

  reader      store.next_chunk -> GET the chunk's tasks -> skip / already written / to predict
  predictors  `PredictRun.one` (fetch + LOW-priority detect), `runners` of them
  writer      what has queued up -> mark "writing" -> one predictions import -> mark done

The reader stays at most one chunk ahead, so memory stays bounded by the queue sizes and the
page size. The writer sends whatever accumulated while its previous request was in flight (up to
`write_batch`), so a slow Label Studio gets fewer, larger imports instead of falling behind.

Failures: an unusable task fails alone. A transient one (Label Studio down, the engine full or
restarting) stops the pass from taking new work; what is already predicted is still written, the
rest stays pending and the caller retries the whole pass after a backoff (the store says what is
left). An image host hiccup leaves its task pending for the next pass, `FETCH_TRIES` times.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ...errors import DeadlineExceeded, ModelNotReady, Overloaded, UpstreamRefused, UpstreamUnavailable, WorkerDied
from .backend import PredictRun, TaskFailed
from .jobstore import JobRecord, JobStore, TaskState
from .lsapi import BulkRefused, LabelStudioAPI

log = logging.getLogger("detserve.labelstudio.jobs")

# Worth waiting for: the service comes back or the queue drains. Anything else fails the job.
TRANSIENT = (UpstreamUnavailable, Overloaded, DeadlineExceeded, ModelNotReady, WorkerDied)
FETCH_TRIES = 3  # a task whose image host keeps timing out fails after this many tries
# A prediction waits up to this long for company before its batch is written. Each import costs
# Label Studio 1.23.2 a recount of the counters of every task in the project, so a project of
# 2,000 tasks written 3 at a time spends more CPU recounting than serving images; the end of a
# pass (a small on-import job) writes at once.
WRITE_LINGER_S = 5.0

Outcome = tuple[int, TaskState, str, int | None]  # task id, state, reason, prediction id


class JobPass:
    """`await JobPass(...).run()` works through every unfinished task once; raises the first
    transient failure (after recording all that finished) so the caller can back off and retry."""

    def __init__(self, job: JobRecord, store: JobStore, api: LabelStudioAPI, predictor: PredictRun, *,
                 page_size: int, write_batch: int, fetch_tries: dict[int, int],
                 record: Callable[[list[Outcome]], None]):
        self.job = job
        self.store = store
        self.api = api
        self.predictor = predictor
        self.page_size = page_size
        self.write_batch = write_batch
        self.fetch_tries = fetch_tries  # task id -> transient fetch failures, across passes of one run
        self.record = record  # stores outcomes (and counts them, publishes progress)
        self.halted: BaseException | None = None  # the first transient failure: take no new work
        self.retry_later: str | None = None  # a task left pending after an image host hiccup
        self.bulk = write_batch > 1  # cleared for the job when Label Studio has no predictions import

    async def run(self) -> None:
        runners = self.predictor.runners
        to_predict: asyncio.Queue = asyncio.Queue(maxsize=runners)
        to_write: asyncio.Queue = asyncio.Queue(maxsize=max(self.write_batch, runners))
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write_loop(to_write))
                predictors = [group.create_task(self._predict_loop(to_predict, to_write)) for _ in range(runners)]
                await self._read(to_predict)
                for _ in predictors:
                    await to_predict.put(None)
                await asyncio.gather(*predictors)
                await to_write.put(None)
                await writer
        except* Exception as grouped:  # a refusal or a bug in one stage: the job handles it, not a group
            raise grouped.exceptions[0] from None
        if self.halted is not None:
            raise self.halted
        if self.retry_later is not None:
            raise UpstreamUnavailable(self.retry_later)

    def _halt(self, exc: BaseException) -> None:
        if self.halted is None:
            self.halted = exc

    # -- stages --------------------------------------------------------------------------------

    async def _read(self, out: asyncio.Queue) -> None:
        after = 0
        while self.halted is None:
            chunk = self.store.next_chunk(self.job.id, self.page_size, after)
            if not chunk:
                return
            after = chunk[-1].task_id
            try:
                todo = await self._sort(chunk)
            except TRANSIENT as exc:
                self._halt(exc)
                return
            for item in todo:
                if self.halted is not None:
                    return
                await out.put(item)

    async def _sort(self, chunk) -> list[tuple[dict, list[int]]]:
        """The chunk's tasks from Label Studio: skipped, found written already, or to predict
        (with the ids of this version's predictions that `force` replaces)."""
        tasks = await self.api.tasks(self.job.spec.project, [t.task_id for t in chunk])
        outcomes: list[Outcome] = []
        todo: list[tuple[dict, list[int]]] = []
        version = self.job.model_version
        for entry in chunk:
            task = tasks.get(entry.task_id)
            if task is None:
                outcomes.append((entry.task_id, TaskState.FAILED, "task not found in the project (deleted?)", None))
                continue
            ours = [pid for pid, v in await self.api.prediction_versions(task) if v == version]
            if ours and entry.state is TaskState.WRITING:
                # Written before a restart or a lost answer: that prediction is this job's own.
                outcomes.append((entry.task_id, TaskState.DONE, "", ours[-1]))
            elif ours and not self.job.spec.force:
                outcomes.append((entry.task_id, TaskState.SKIPPED, f"already has a prediction of {version}", None))
            else:
                todo.append((task, ours))
        self.record(outcomes)
        return todo

    async def _predict_loop(self, inbox: asyncio.Queue, out: asyncio.Queue) -> None:
        while (item := await inbox.get()) is not None:
            if self.halted is not None:
                continue  # drained without predicting: the task stays pending for the next pass
            task, replaced = item
            try:
                prediction = await self.predictor.one(task)
            except TaskFailed as exc:
                self._failed(task["id"], exc)
                continue
            except TRANSIENT as exc:
                self._halt(exc)
                continue
            await out.put((task, replaced, prediction))

    def _failed(self, task_id: int, exc: TaskFailed) -> None:
        if not exc.transient:
            self.record([(task_id, TaskState.FAILED, exc.reason, None)])
            return
        tries = self.fetch_tries[task_id] = self.fetch_tries.get(task_id, 0) + 1
        if tries < FETCH_TRIES:
            self.retry_later = self.retry_later or exc.reason
        else:
            self.record([(task_id, TaskState.FAILED, f"{exc.reason} ({tries} tries)", None)])

    async def _write_loop(self, inbox: asyncio.Queue) -> None:
        ended = False
        while not ended:
            item = await inbox.get()
            if item is None:
                return
            batch = [item]
            loop = asyncio.get_running_loop()
            linger_until = loop.time() + WRITE_LINGER_S
            while len(batch) < self.write_batch:
                try:
                    if not inbox.empty():
                        item = inbox.get_nowait()
                    else:
                        item = await asyncio.wait_for(inbox.get(), max(0.0, linger_until - loop.time()))
                except TimeoutError:
                    break
                if item is None:
                    ended = True
                    break
                batch.append(item)
            if self.halted is not None and isinstance(self.halted, UpstreamUnavailable):
                continue  # Label Studio is down: these stay pending, predicted again next pass
            await self._flush(batch)

    # -- writing -------------------------------------------------------------------------------

    async def _flush(self, batch: list[tuple[dict, list[int], dict]]) -> None:
        # From here a prediction may reach Label Studio before its row says so: "writing" makes a
        # restart (or the next pass) look in Label Studio first.
        self.record([(task["id"], TaskState.WRITING, "", None) for task, _, _ in batch])
        try:
            # force: the old prediction of this version goes first, so a crash in between leaves
            # none (the resumed job writes it) rather than two.
            for prediction_id in (pid for _, replaced, _ in batch for pid in replaced if isinstance(pid, int)):
                await self.api.delete_prediction(prediction_id)
            if self.bulk:
                if await self._import(batch):
                    return
            await self._write_each(batch)
        except TRANSIENT as exc:
            self._halt(exc)  # the rows stay "writing": the next pass looks in Label Studio first

    async def _import(self, batch) -> bool:
        """One predictions import for the batch; False when it must be written one by one."""
        items = [{"task": task["id"], **prediction} for task, _, prediction in batch]
        try:
            created = await self.api.import_predictions(self.job.spec.project, items)
        except BulkRefused as exc:
            if exc.status != 400:
                log.info("label studio job %s: no predictions import (%s); writing one by one", self.job.id, exc.message)
                self.bulk = False
            return False  # 400: a task of the batch is gone; one by one, only that task fails
        if created != len(items):
            # Not what an import of 1.23.2 answers; the next pass checks each task in Label Studio.
            self.retry_later = f"Label Studio created {created} of {len(items)} imported predictions"
            return True
        self.record([(task["id"], TaskState.DONE, "", None) for task, _, _ in batch])
        return True

    async def _write_each(self, batch) -> None:
        written = await asyncio.gather(*(self.api.create_prediction(task["id"], prediction)
                                         for task, _, prediction in batch), return_exceptions=True)
        outcomes: list[Outcome] = []
        for (task, _, _), outcome in zip(batch, written):
            if isinstance(outcome, UpstreamRefused):
                outcomes.append((task["id"], TaskState.FAILED, f"Label Studio refused the prediction: {outcome.message}", None))
            elif isinstance(outcome, TRANSIENT):
                self._halt(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                outcomes.append((task["id"], TaskState.DONE, "", outcome))
        self.record(outcomes)
