"""The few Label Studio REST calls a pre-annotation job makes (Label Studio 1.23.2 API).

Every call goes through the same address policy, pinning and API key rules as the image fetcher
(`fetch.ImageFetcher`): the key goes only to the configured Label Studio, and personal access
tokens are exchanged once and shared. A semaphore shared by all jobs bounds the calls in flight.

Failures are sorted for the job runner: `UpstreamUnavailable` (connection refused, timeout, 5xx,
429) means "pause and retry", `UpstreamRefused` (other 4xx, a body that is not JSON) means
"retrying this call will not help".
"""
from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from ...errors import UpstreamRefused, UpstreamUnavailable
from .fetch import ImageFetcher, is_jwt
from .outbound import FetchRefused, ImageFetchError, open_hop

MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # one page of tasks with their predictions
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class TaskPage:
    ids: list[int]
    total: int


class BulkRefused(UpstreamRefused):
    """Label Studio refused a predictions import as a whole; `status` tells the job what to do next
    (400: write the batch one by one, so that only the bad task fails; 404/405: no bulk endpoint)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _no_predictions(task: dict) -> bool:
    count = task.get("total_predictions")
    return isinstance(count, int) and not isinstance(count, bool) and count == 0


def _predictions_known(task: dict) -> bool:
    """The task object says what predictions it has: their list (objects or ids), or a count of none."""
    return isinstance(task.get("predictions"), list) or _no_predictions(task)


def _task_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class LabelStudioAPI:
    """Label Studio's task, prediction and project endpoints, for one job."""

    def __init__(self, fetcher: ImageFetcher, slots: asyncio.Semaphore):
        self.fetcher = fetcher  # shares the client, policy, tokens and URL of the job's image fetches
        self.slots = slots
        self.base = fetcher.config.url

    async def project(self, project: int) -> dict:
        body = await self._call("GET", f"/api/projects/{project}")
        if not isinstance(body, dict):
            raise UpstreamRefused(f"GET /api/projects/{project} did not answer a project object")
        return body

    async def task_ids(self, project: int, page: int, page_size: int, *, view: int | None = None,
                       filters: dict | None = None) -> TaskPage:
        """One page of the ids of a project's tasks (or of a Data Manager view or filter), in id order."""
        params: dict[str, Any] = {"project": project, "page": page, "page_size": page_size, "include": "id",
                                  "fields": "task_only"}
        if view is not None:
            params["view"] = view
        else:
            query: dict[str, Any] = {"ordering": ["tasks:id"]}
            if filters is not None:
                query["filters"] = filters
            params["query"] = json.dumps(query, separators=(",", ":"))
        body = await self._call("GET", "/api/tasks", params=params, end_of_pages_ok=page > 1)
        if body is None:  # past the last page
            return TaskPage([], 0)
        tasks, total = self._task_list(body)
        return TaskPage([t for t in (_task_id(task.get("id")) for task in tasks) if t is not None], total)

    async def tasks(self, project: int, task_ids: list[int]) -> dict[int, dict]:
        """The tasks of `task_ids` by id (deleted ones are absent), each with its data and, when it
        has any, its predictions.

        Two reads, because Label Studio 1.23.2 spends most of a task list on fields a job never
        uses: 100 tasks cost it 950 ms of CPU with every field, 160 ms with `include=id,data,
        total_predictions` and 360 ms with the prediction objects (measured on loopback), and that
        CPU is the worker's on a shared machine. So all tasks come with their prediction count,
        and only those that have predictions are read again with them (none, in a new project).
        A Label Studio that ignores `include` sends every field the first time.
        """
        found = await self._task_objects(project, task_ids, "id,data,total_predictions")
        again = [tid for tid, task in found.items() if not _predictions_known(task)]
        if again:
            found.update(await self._task_objects(project, again, "id,data,predictions"))
        return found

    async def _task_objects(self, project: int, task_ids: list[int], include: str) -> dict[int, dict]:
        query = json.dumps({"selectedItems": {"all": False, "included": task_ids}}, separators=(",", ":"))
        wanted, found, page = set(task_ids), {}, 1
        while True:
            params = {"project": project, "page": page, "page_size": len(task_ids), "fields": "all",
                      "include": include, "query": query}
            body = await self._call("GET", "/api/tasks", params=params, end_of_pages_ok=page > 1)
            if body is None:
                return found
            tasks, total = self._task_list(body)
            found.update((tid, task) for task in tasks if (tid := _task_id(task.get("id"))) in wanted)
            # A page cap (TASK_API_PAGE_SIZE_MAX) cuts the page short: the rest is on the next ones.
            if not tasks or len(found) >= min(total, len(wanted)) or page >= len(wanted):
                return found
            page += 1

    async def prediction_versions(self, task: dict) -> list[tuple[int, str]]:
        """(prediction id, model_version) of each prediction the task holds. The task list carries
        prediction objects; when it carries only ids, the task's predictions are asked for."""
        if "predictions" not in task and _no_predictions(task):
            return []
        listed = task.get("predictions") or []
        if isinstance(listed, list) and all(isinstance(p, dict) for p in listed):
            return [(p.get("id"), str(p.get("model_version") or "")) for p in listed]
        body = await self._call("GET", "/api/predictions", params={"task": task["id"]})
        items = body if isinstance(body, list) else (body or {}).get("results", []) if isinstance(body, dict) else []
        return [(p.get("id"), str(p.get("model_version") or "")) for p in items if isinstance(p, dict)]

    async def create_prediction(self, task_id: int, prediction: dict) -> int | None:
        body = await self._call("POST", "/api/predictions", json={"task": task_id, **prediction})
        return _task_id(body.get("id")) if isinstance(body, dict) else None

    async def import_predictions(self, project: int, predictions: list[dict]) -> int:
        """Many predictions in one request (`POST /api/projects/{id}/import/predictions`, each item
        {"task": id, "result", "score", "model_version"}); returns how many Label Studio created.
        All or nothing: a task that is not in the project refuses the whole request (400), and a
        Label Studio without the endpoint answers 404 or 405 (`BulkRefused` with the status)."""
        status, body = await self._exchange("POST", f"/api/projects/{project}/import/predictions", json=predictions)
        if status in (400, 404, 405):
            raise BulkRefused(status, f"Label Studio answered {status} to POST /api/projects/{project}/import/predictions")
        created = self._decode(status, body, f"POST /api/projects/{project}/import/predictions")
        count = created.get("created") if isinstance(created, dict) else None
        if not isinstance(count, int) or isinstance(count, bool):
            raise UpstreamRefused("Label Studio's answer to a predictions import has no 'created' count")
        return count

    async def delete_prediction(self, prediction_id: int) -> None:
        await self._call("DELETE", f"/api/predictions/{int(prediction_id)}", end_of_pages_ok=True)

    # -- plumbing ----------------------------------------------------------------------------

    @staticmethod
    def _task_list(body: Any) -> tuple[list[dict], int]:
        # The Data Manager answers {"tasks": [...], "total": N, ...}; a plain list is accepted too.
        tasks = body.get("tasks") if isinstance(body, dict) else body
        if not isinstance(tasks, list):
            raise UpstreamRefused("GET /api/tasks did not answer a task list")
        tasks = [t for t in tasks if isinstance(t, dict)]
        total = body.get("total") if isinstance(body, dict) else None
        return tasks, total if isinstance(total, int) and not isinstance(total, bool) else len(tasks)

    async def _call(self, method: str, path: str, *, params: dict | None = None, json: dict | None = None,
                    end_of_pages_ok: bool = False) -> Any:
        status, raw = await self._exchange(method, path, params=params, json=json)
        if status == 404 and end_of_pages_ok:
            return None
        return self._decode(status, raw, f"{method} {path}")

    async def _exchange(self, method: str, path: str, *, params: dict | None = None,
                        json: dict | list | None = None) -> tuple[int, bytes]:
        if not self.base:
            raise UpstreamRefused("labelstudio.url (LABEL_STUDIO_URL) is not set: jobs need a Label Studio to read tasks from")
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        async with self.slots:
            status, raw = await self._send(method, url, json)
            key = self.fetcher.config.api_key
            if status == 401 and key and is_jwt(key):
                self.fetcher.tokens.forget(self.base, key)  # expired early: exchange once more
                status, raw = await self._send(method, url, json)
        return status, raw

    @staticmethod
    def _decode(status: int, raw: bytes, where: str) -> Any:
        if status in _RETRYABLE_STATUSES:
            raise UpstreamUnavailable(f"Label Studio answered {status} to {where}")
        if not 200 <= status < 300:
            snippet = raw[:200].decode("utf-8", "replace") if raw else ""
            raise UpstreamRefused(f"Label Studio answered {status} to {where}: {snippet}")
        if status == 204 or not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamRefused(f"Label Studio answered {where} with a body that is not JSON") from None

    async def _send(self, method: str, url: str, body: dict | list | None) -> tuple[int, bytes]:
        fetcher = self.fetcher
        try:
            headers = await fetcher.auth_header()
            async with asyncio.timeout(fetcher.config.timeout_s):
                resp = await open_hop(fetcher.client, fetcher.policy, method, url, headers=headers, json=body)
                try:
                    chunks, size = [], 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > MAX_RESPONSE_BYTES:
                            raise UpstreamRefused(f"Label Studio's answer to {method} is over {MAX_RESPONSE_BYTES} bytes")
                        chunks.append(chunk)
                    return resp.status_code, b"".join(chunks)
                finally:
                    await resp.aclose()
        except TimeoutError:
            raise UpstreamUnavailable(f"Label Studio did not answer {method} within {fetcher.config.timeout_s} s") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"cannot reach Label Studio: {type(exc).__name__}: {exc}") from None
        except FetchRefused as exc:  # the address policy: the same answer every time
            raise UpstreamRefused(exc.message) from None
        except ImageFetchError as exc:  # the token exchange
            raise UpstreamUnavailable(exc.message) from None
