"""Acceptance of background jobs (issue 17) against a real Label Studio 1.23.2 on loopback.

One project of DETSERVE_LS_JOB_TASKS generated images (default 200; the issue's figure is 2,000)
is uploaded once; the other projects import the same uploaded files as JSON tasks, which costs
Label Studio no second upload. `detserve serve` runs the bundled `rtmdet` with Basic auth on, as
docs/labelstudio.md recommends, and a job store in the test's folder.

- a whole project is pre-annotated by one job: every task one prediction of the model's version,
  the same regions and score as /predict gives for that task; a second job skips every task;
- a job whose server is SIGKILLed mid-way resumes when the server starts again on the same store
  and ends exactly as an uninterrupted job (one prediction per task, the same results);
- with on-import on, importing 50 tasks gives each a prediction, with no click.
"""
from __future__ import annotations

import base64
import os
import random
import time
from collections import Counter

import httpx
import pytest

from service.bench.labelstudio import LabelStudio
from service.bench.lsjobs import RECT_CONFIG, Detserve, run_job, shape_files

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(7200)]

NUM_TASKS = int(os.environ.get("DETSERVE_LS_JOB_TASKS", "200"))
ON_IMPORT_TASKS = 50
COMPARED = 200  # tasks whose stored prediction is compared with /predict (all of them up to this many)
BASIC = ("labelstudio", "s3cret-pass")


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    with LabelStudio(tmp_path_factory.mktemp("label-studio")) as ls:
        yield ls


@pytest.fixture(scope="module")
def ls_client(label_studio):
    client = label_studio.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def uploaded(ls_client, tmp_path_factory):
    """The uploaded project: its id and its tasks (id order)."""
    files = shape_files(tmp_path_factory.mktemp("shapes"), NUM_TASKS)
    project = ls_client.create_project("jobs: uploaded", RECT_CONFIG)
    ls_client.upload(project, files)
    tasks = ls_client.tasks(project)
    assert len(tasks) == NUM_TASKS and all(t["data"]["image"].startswith("/data/upload/") for t in tasks)
    return {"project": project, "tasks": tasks}


def same_images_project(ls_client, uploaded, title: str, count: int | None = None) -> int:
    project = ls_client.create_project(title, RECT_CONFIG)
    ls_client.import_tasks(project, [{"image": t["data"]["image"]} for t in uploaded["tasks"][:count]])
    return project


def predictions_by_task(ls_client, project: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in ls_client.predictions(project):
        out.setdefault(p["task"], []).append(p)
    return out


def model_version(ds: Detserve) -> str:
    return httpx.post(f"{ds.url}/labelstudio/rtmdet/setup", json={}, auth=BASIC, timeout=30).json()["model_version"]


def assert_one_prediction_each(by_task: dict, tasks: list[dict], version: str) -> None:
    counts = Counter(len(by_task.get(t["id"], [])) for t in tasks)
    assert counts == {1: len(tasks)}, f"predictions per task: {dict(counts)}"
    assert {p["model_version"] for preds in by_task.values() for p in preds} == {version}


def test_one_job_pre_annotates_the_whole_project_as_predict_does(label_studio, ls_client, uploaded, tmp_path):
    project, tasks = uploaded["project"], uploaded["tasks"]
    with Detserve(tmp_path, label_studio, basic_auth=BASIC) as ds:
        view = run_job(ds.url, project, auth=BASIC)
        print(f"\njob over {NUM_TASKS} tasks: {view['seconds']} s, {view['per_s']} tasks/s")
        assert (view["state"], view["done"], view["skipped"], view["failed"]) == ("done", NUM_TASKS, 0, 0), view
        version = model_version(ds)
        by_task = predictions_by_task(ls_client, project)
        assert_one_prediction_each(by_task, tasks, version)
        assert sum(len(p["result"]) for preds in by_task.values() for p in preds) > 0

        # What /predict answers for the same tasks, as Label Studio would send them.
        sample = tasks if len(tasks) <= COMPARED else random.Random(17).sample(tasks, COMPARED)
        for start in range(0, len(sample), 50):
            chunk = sample[start:start + 50]
            resp = httpx.post(f"{ds.url}/labelstudio/rtmdet/predict", auth=BASIC, timeout=300, json={
                "tasks": [{"id": t["id"], "data": t["data"]} for t in chunk], "label_config": RECT_CONFIG})
            assert resp.status_code == 200, resp.text[:500]
            for task, expected in zip(chunk, resp.json()["results"]):
                stored = by_task[task["id"]][0]
                assert stored["result"] == expected["result"], task["id"]
                assert (stored["score"], stored["model_version"]) == (expected["score"], expected["model_version"])

        again = run_job(ds.url, project, auth=BASIC)  # idempotent: nothing new is written
        assert (again["state"], again["done"], again["skipped"]) == ("done", 0, NUM_TASKS)
        assert sum(map(len, predictions_by_task(ls_client, project).values())) == NUM_TASKS


def test_a_killed_server_resumes_the_job_and_ends_as_if_never_killed(label_studio, ls_client, uploaded, tmp_path):
    project = same_images_project(ls_client, uploaded, "jobs: killed")
    tasks = ls_client.tasks(project)
    base = "/labelstudio/rtmdet/jobs"
    first = Detserve(tmp_path, label_studio, basic_auth=BASIC).start()
    try:
        job = httpx.post(f"{first.url}{base}", json={"project": project}, auth=BASIC, timeout=60).json()
        deadline = time.monotonic() + 1800
        while (view := httpx.get(f"{first.url}{base}/{job['id']}", auth=BASIC, timeout=60).json())["done"] < NUM_TASKS // 3:
            assert view["state"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline, view
            time.sleep(0.1)
    finally:
        first.kill()  # SIGKILL, front and workers: no drain, nothing recorded on the way out
    written_before = sum(map(len, predictions_by_task(ls_client, project).values()))
    print(f"\nkilled with {view['done']} done of {NUM_TASKS}; {written_before} predictions in Label Studio")
    assert NUM_TASKS // 3 <= written_before < NUM_TASKS

    with Detserve(tmp_path, label_studio, basic_auth=BASIC) as second:  # same folder, so the same job store
        deadline = time.monotonic() + 1800
        while (view := httpx.get(f"{second.url}{base}/{job['id']}", auth=BASIC, timeout=60).json())["state"] != "done":
            assert view["state"] not in ("failed", "cancelled") and time.monotonic() < deadline, view
            time.sleep(0.25)
        version = model_version(second)
    assert (view["done"], view["skipped"], view["failed"], view["pending"]) == (NUM_TASKS, 0, 0, 0), view
    by_task = predictions_by_task(ls_client, project)
    assert_one_prediction_each(by_task, tasks, version)
    # The same end state as the uninterrupted job over the same images (the model is deterministic).
    reference = predictions_by_task(ls_client, uploaded["project"])
    if reference:  # the first test ran in this session
        ref_by_image = {t["data"]["image"]: reference[t["id"]][0] for t in uploaded["tasks"] if t["id"] in reference}
        for task in tasks:
            ref = ref_by_image[task["data"]["image"]]
            assert by_task[task["id"]][0]["result"] == ref["result"]


def test_imported_tasks_get_predictions_without_a_click(label_studio, ls_client, uploaded, tmp_path):
    project = ls_client.create_project("jobs: on import", RECT_CONFIG)  # its id must be in the config
    config = f"[labelstudio.jobs]\non_import_projects = [{project}]\n"
    with Detserve(tmp_path, label_studio, basic_auth=BASIC, config=config) as ds:
        ls_client.connect_backend(project, f"{ds.url}/labelstudio/rtmdet", basic_auth=BASIC)
        hooks = [h for h in ls_client.webhooks(project) if h["url"].endswith("/labelstudio/rtmdet/webhook")]
        assert len(hooks) == 1, ls_client.webhooks(project)  # Label Studio made it when the model was connected
        # ... without credentials: with Basic auth on, the user adds the header (docs/labelstudio.md).
        basic = base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()
        ls_client.http.patch(f"/api/webhooks/{hooks[0]['id']}", json={"headers": {"Authorization": f"Basic {basic}"}}
                             ).raise_for_status()
        started = time.monotonic()
        ls_client.import_tasks(project, [{"image": t["data"]["image"]} for t in uploaded["tasks"][:ON_IMPORT_TASKS]])
        tasks = ls_client.tasks(project)
        assert len(tasks) == ON_IMPORT_TASKS
        while len(by_task := predictions_by_task(ls_client, project)) < ON_IMPORT_TASKS:
            assert time.monotonic() - started < 600, f"{len(by_task)} of {ON_IMPORT_TASKS} predicted after 600 s"
            time.sleep(0.5)
        print(f"\n{ON_IMPORT_TASKS} imported tasks predicted {time.monotonic() - started:.1f} s after the import")
        jobs = httpx.get(f"{ds.url}/labelstudio/rtmdet/jobs", auth=BASIC, timeout=30).json()
        version = model_version(ds)
    ours = [j for j in jobs["jobs"] if j["project"] == project]
    assert [j["origin"] for j in ours] == ["on_import"] and ours[0]["total"] == ON_IMPORT_TASKS
    time.sleep(1.0)  # nothing more arrives: one job, one prediction each
    assert_one_prediction_each(predictions_by_task(ls_client, project), tasks, version)
