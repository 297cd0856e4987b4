"""Where pre-annotation jobs live between restarts: one SQLite file, jobs and their tasks.

A job's task ids are listed once from Label Studio (page by page, each page committed with the
page number to resume from) and then worked through in id order. Each task row moves
pending -> writing -> done, or to skipped / failed with a reason. "writing" means a prediction
may already be in Label Studio: after a crash such a task is checked there before it is written
again, which is what keeps a resumed job from writing duplicates.

Synchronous on purpose: every statement is a few index lookups in a local file, committed in one
transaction per page or chunk; the job runner calls it from the event loop.
"""
from __future__ import annotations

import enum
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path


class JobState(str, enum.Enum):
    QUEUED = "queued"  # waiting for a running slot
    LISTING = "listing"  # reading task ids from Label Studio
    RUNNING = "running"
    PAUSED = "paused"  # Label Studio or the engine unavailable: retrying with backoff
    DONE = "done"
    FAILED = "failed"  # the job as a whole (reason says why); per-task failures do not fail it
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class TaskState(str, enum.Enum):
    PENDING = "pending"
    WRITING = "writing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the client asked for; stored as JSON with the job."""

    project: int
    task_ids: tuple[int, ...] | None = None
    view: int | None = None
    filters: dict | None = None
    force: bool = False
    origin: str = "api"  # "api", "on_import", "cli"

    def to_json(self) -> str:
        return json.dumps({"project": self.project, "task_ids": list(self.task_ids) if self.task_ids is not None else None,
                           "view": self.view, "filters": self.filters, "force": self.force, "origin": self.origin})

    @classmethod
    def from_json(cls, raw: str) -> "JobSpec":
        d = json.loads(raw)
        ids = d.get("task_ids")
        return cls(project=d["project"], task_ids=tuple(ids) if ids is not None else None, view=d.get("view"),
                   filters=d.get("filters"), force=bool(d.get("force")), origin=d.get("origin", "api"))


@dataclass(slots=True)
class JobRecord:
    id: str
    model: str
    spec: JobSpec
    model_version: str
    state: JobState
    reason: str
    created_at: float
    updated_at: float
    finished_at: float | None
    listed: bool
    next_page: int
    counts: dict[TaskState, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return self.counts.get(TaskState.PENDING, 0) + self.counts.get(TaskState.WRITING, 0)


@dataclass(frozen=True, slots=True)
class ChunkTask:
    task_id: int
    state: TaskState


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    spec TEXT NOT NULL,
    model_version TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    listed INTEGER NOT NULL DEFAULT 0,
    next_page INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS job_tasks (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    task_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    prediction_id INTEGER,
    PRIMARY KEY (job_id, task_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_tasks_state ON job_tasks (job_id, state, task_id);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model, created_at);
"""


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from the event loop thread only.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never corrupt
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- jobs -------------------------------------------------------------------------------

    def create(self, job_id: str, model: str, spec: JobSpec, model_version: str) -> JobRecord:
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT INTO jobs (id, model, spec, model_version, state, created_at, updated_at, listed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, model, spec.to_json(), model_version, JobState.QUEUED.value, now, now,
                 int(spec.task_ids is not None)),
            )
            if spec.task_ids is not None:
                self._add_tasks(job_id, spec.task_ids)
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        where, args = ("WHERE model = ?", (model,)) if model is not None else ("", ())
        rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ?", (*args, limit))
        return [self._record(r) for r in rows.fetchall()]

    def unfinished(self) -> list[JobRecord]:
        finished = tuple(s.value for s in JobState if s.finished)
        rows = self._db.execute(
            f"SELECT * FROM jobs WHERE state NOT IN ({','.join('?' * len(finished))}) ORDER BY created_at, id", finished)
        return [self._record(r) for r in rows.fetchall()]

    def set_state(self, job_id: str, state: JobState, reason: str = "") -> None:
        now = time.time()
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (state.value, reason[:2000], now, now if state.finished else None, job_id),
            )

    def prune(self, keep: int) -> int:
        """Forget the oldest finished jobs beyond `keep` (and their tasks)."""
        finished = tuple(s.value for s in JobState if s.finished)
        marks = ",".join("?" * len(finished))
        with self._tx():
            cur = self._db.execute(
                f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ({marks}) "
                f"ORDER BY created_at DESC, id LIMIT -1 OFFSET ?)", (*finished, keep))
        return cur.rowcount

    # -- listing ----------------------------------------------------------------------------

    def add_page(self, job_id: str, task_ids: list[int], next_page: int, last: bool) -> None:
        """One page of listed task ids, and where to continue, in one transaction."""
        with self._tx():
            self._add_tasks(job_id, task_ids)
            self._db.execute("UPDATE jobs SET next_page = ?, listed = ?, updated_at = ? WHERE id = ?",
                             (next_page, int(last), time.time(), job_id))

    def _add_tasks(self, job_id: str, task_ids) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO job_tasks (job_id, task_id, state) VALUES (?, ?, ?)",
            ((job_id, int(t), TaskState.PENDING.value) for t in task_ids),
        )

    # -- tasks ------------------------------------------------------------------------------

    def next_chunk(self, job_id: str, size: int, after: int = 0) -> list[ChunkTask]:
        """Up to `size` unfinished tasks with ids above `after`, in id order."""
        rows = self._db.execute(
            "SELECT task_id, state FROM job_tasks WHERE job_id = ? AND state IN (?, ?) AND task_id > ? "
            "ORDER BY task_id LIMIT ?",
            (job_id, TaskState.PENDING.value, TaskState.WRITING.value, after, size),
        ).fetchall()
        return [ChunkTask(task_id, TaskState(state)) for task_id, state in rows]

    def mark(self, job_id: str, outcomes: list[tuple[int, TaskState, str, int | None]]) -> None:
        """(task id, state, reason, prediction id) for each task, in one transaction."""
        if not outcomes:
            return
        with self._tx():
            self._db.executemany(
                "UPDATE job_tasks SET state = ?, reason = ?, prediction_id = ? WHERE job_id = ? AND task_id = ?",
                ((state.value, reason[:500], pred, job_id, task_id) for task_id, state, reason, pred in outcomes),
            )
            self._db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time(), job_id))

    def failures(self, job_id: str, limit: int = 50) -> list[tuple[int, str]]:
        rows = self._db.execute(
            "SELECT task_id, reason FROM job_tasks WHERE job_id = ? AND state = ? ORDER BY task_id LIMIT ?",
            (job_id, TaskState.FAILED.value, limit))
        return rows.fetchall()

    def counts(self, job_id: str) -> dict[TaskState, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM job_tasks WHERE job_id = ? GROUP BY state", (job_id,))
        return {TaskState(state): n for state, n in rows.fetchall()}

    # -- helpers ----------------------------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db)

    def _record(self, row) -> JobRecord:
        (job_id, model, spec, version, state, reason, created, updated, finished, listed, next_page) = row
        return JobRecord(id=job_id, model=model, spec=JobSpec.from_json(spec), model_version=version,
                         state=JobState(state), reason=reason, created_at=created, updated_at=updated,
                         finished_at=finished, listed=bool(listed), next_page=next_page, counts=self.counts(job_id))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (autocommit connection)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
