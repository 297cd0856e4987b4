"""Background pre-annotation jobs against a fake Label Studio on loopback (tests/fakes.py).

The runner is driven through its public API (submit / wait / cancel / start / stop) over the
in-test BlobEngine; the routes through the real inference app. Restarts are new JobRunners on the
same SQLite file."""
from __future__ import annotations

import asyncio
import time

import pytest
from fakes import BlobEngine, FakeLabelStudio, fake_label_studio, png_bytes, sample
from fastapi.testclient import TestClient

from service.protocols.labelstudio.backend import LabelStudioBackend
from service.protocols.labelstudio.jobs import JobRunner
from service.protocols.labelstudio.jobstore import JobSpec, JobStore, TaskState
from service.protocols.rest.app import build_inference_app
from service.settings import LabelStudioJobSettings, LabelStudioSettings, ServerSettings
from service.types import Priority

VERSION = "blobs-1a2b3c4d"
RECT_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Blob" predicted_values="blob"/></RectangleLabels></View>"""
TOKEN = "ls-token"


@pytest.fixture(autouse=True)
def no_ls_env(monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                 "LOCAL_FILES_DOCUMENT_ROOT", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)


def project(num_tasks: int, **kwargs) -> FakeLabelStudio:
    ls = FakeLabelStudio(token=TOKEN, label_config=RECT_CONFIG, **kwargs)
    for i in range(1, num_tasks + 1):
        ls.add_task(i, png_bytes(60, 40, (5 + i % 20, 5, 30 + i % 20, 30)))
    return ls


def settings_for(ls: FakeLabelStudio, tmp_path, **jobs) -> ServerSettings:
    job_cfg = {"store_path": tmp_path / "jobs.sqlite3", "page_size": 10, "retry_initial_s": 0.01,
               "retry_max_s": 0.05, **jobs}
    return ServerSettings(labelstudio=LabelStudioSettings(url=ls.url, api_key=TOKEN,
                                                          jobs=LabelStudioJobSettings(**job_cfg)))


def runner_for(settings: ServerSettings, engine=None, **kwargs) -> JobRunner:
    return JobRunner(engine or BlobEngine(), settings, JobStore(settings.labelstudio.jobs.store_path), **kwargs)


def run_job(settings, spec: JobSpec, engine=None, **kwargs):
    async def go():
        runner = runner_for(settings, engine, **kwargs)
        view = runner.submit("blobs", spec)
        done = await runner.wait(view.id)
        await runner.stop()
        return done
    return asyncio.run(go())


def one_per_task(ls: FakeLabelStudio) -> bool:
    return all(len(ls.predictions_of(t, VERSION)) == 1 for t in ls.tasks)


def test_a_job_pages_through_the_project_and_writes_what_predict_returns(tmp_path):
    engine = BlobEngine()
    with fake_label_studio(project(25)) as ls:
        settings = settings_for(ls, tmp_path)
        view = run_job(settings, JobSpec(project=1), engine)
        assert (view.state, view.total, view.done, view.skipped, view.failed) == ("done", 25, 25, 0, 0)
        assert one_per_task(ls) and len(ls.predictions) == 25
        assert ls.task_reads.count("id") == 1  # the ids in one page (LIST_PAGE_SIZE), not page_size at a time
        assert len(ls.task_reads) >= 1 + 3  # then 3 chunks of tasks (page_size 10)
        assert set(engine.priorities) == {Priority.LOW}  # jobs never compete with interactive traffic

        # The same tasks through /predict give the same regions, score and version.
        tasks = [{"id": t, "data": ls.tasks[t]["data"]} for t in sorted(ls.tasks)]
        predicted = asyncio.run(LabelStudioBackend(settings.labelstudio).predict(
            engine, settings, "blobs", {"tasks": tasks, "label_config": RECT_CONFIG}))["results"]
        for task, expected in zip(tasks, predicted):
            stored = ls.predictions_of(task["id"], VERSION)[0]
            assert stored["result"] == expected["result"] and stored["score"] == expected["score"]
            assert stored["model_version"] == expected["model_version"] == VERSION
            assert stored["result"][0]["value"]["rectanglelabels"] == ["Blob"]


def test_predictions_are_written_in_batches_and_one_by_one_without_the_import_endpoint(tmp_path):
    with fake_label_studio(project(25)) as ls:
        view = run_job(settings_for(ls, tmp_path, write_batch=8), JobSpec(project=1))
        assert (view.done, view.failed) == (25, 0) and one_per_task(ls)
        assert sum(ls.imports) == 25 and max(ls.imports) <= 8 and len(ls.imports) < 25
        assert ("POST", "/api/predictions") not in ls.requests
    with fake_label_studio(project(12, bulk_import=False)) as ls:  # an older Label Studio
        view = run_job(settings_for(ls, tmp_path / "old"), JobSpec(project=1))
        assert (view.done, view.failed) == (12, 0) and one_per_task(ls)
        assert ls.requests.count(("POST", "/api/predictions")) == 12
        imports = [p for m, p in ls.requests if p.endswith("/import/predictions")]
        assert len(imports) == 1  # tried once, then one by one for the rest of the job


def test_a_refused_import_is_written_one_by_one_so_only_the_bad_task_fails(tmp_path):
    with fake_label_studio(project(10)) as ls:
        ls.refuse_predictions_for = {4}  # e.g. deleted between reading and writing
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.state, view.done, view.failed) == ("done", 9, 1)
        assert view.failures[0]["task"] == 4 and "refused" in view.failures[0]["reason"]
        assert all(len(ls.predictions_of(t, VERSION)) == (t != 4) for t in ls.tasks)


def test_reading_predicting_and_writing_overlap_across_chunks(tmp_path):
    engine = BlobEngine(delay_s=0.3)  # slow enough that the reader gets ahead on a busy machine
    with fake_label_studio(project(24)) as ls:
        view = run_job(settings_for(ls, tmp_path, page_size=3, max_in_flight=8), JobSpec(project=1), engine)
        assert (view.done, view.failed) == (24, 0) and one_per_task(ls)
        # Chunk by chunk, at most a chunk (3) would be in the engine at once; overlapped, the
        # engine holds the job's whole allowance.
        assert engine.max_in_flight == 8
        reads = [i for i, (m, p) in enumerate(ls.requests) if p == "/api/tasks"]
        first_write = next(i for i, (m, p) in enumerate(ls.requests) if p.endswith("/import/predictions"))
        assert sum(i < first_write for i in reads) >= 1 + 2  # the ids, then chunks read ahead of the writes


def test_a_job_reads_uploads_from_the_upload_root_when_it_has_them(tmp_path):
    with fake_label_studio(project(6)) as ls:
        root = tmp_path / "upload"
        (root / "1").mkdir(parents=True)
        for name in ("1.png", "2.png", "3.png"):  # the other three only Label Studio has
            (root / "1" / name).write_bytes(ls.images[name])
        settings = settings_for(ls, tmp_path)
        settings = settings.model_copy(update={"labelstudio": settings.labelstudio.model_copy(update={"upload_root": root})})
        view = run_job(settings, JobSpec(project=1))
        assert (view.done, view.failed) == (6, 0) and one_per_task(ls)
        served = sorted(p.rsplit("/", 1)[-1] for m, p in ls.requests if p.startswith("/data/upload/"))
        assert served == ["4.png", "5.png", "6.png"]


def test_tasks_with_a_prediction_of_this_version_are_skipped_unless_force(tmp_path):
    with fake_label_studio(project(12)) as ls:
        settings = settings_for(ls, tmp_path)
        old = {t: ls.add_prediction(t, VERSION) for t in (2, 3)}
        ls.add_prediction(4, "someone-else-v1")
        view = run_job(settings, JobSpec(project=1))
        assert (view.done, view.skipped, view.failed) == (10, 2, 0)
        assert one_per_task(ls) and len(ls.predictions_of(4)) == 2  # other versions are left alone
        assert [p["id"] for p in ls.predictions_of(2, VERSION)] == [old[2]]

        again = run_job(settings, JobSpec(project=1))  # idempotent: a second job writes nothing
        assert (again.done, again.skipped) == (0, 12) and len(ls.predictions) == 13

        forced = run_job(settings, JobSpec(project=1, task_ids=(2, 3, 4), force=True))
        assert (forced.done, forced.skipped) == (3, 0)
        assert one_per_task(ls)  # replaced, not duplicated
        assert ls.predictions_of(2, VERSION)[0]["id"] != old[2] and ls.predictions_of(2, VERSION)[0]["result"]


def test_tasks_are_read_with_their_prediction_count_and_again_only_where_they_have_predictions(tmp_path):
    with fake_label_studio(project(20)) as ls:  # page_size 10: two chunks
        ls.add_prediction(13, VERSION)
        ls.add_prediction(14, "someone-else-v1")
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.done, view.skipped, view.failed) == (19, 1, 0) and one_per_task(ls)
        chunk_reads = [r for r in ls.task_reads if r != "id"]
        # the first chunk has no predictions: one cheap read; the second is read again for 13 and 14
        assert chunk_reads == ["id,data,total_predictions", "id,data,total_predictions", "id,data,predictions"]


def test_task_ids_are_listed_to_the_end_when_label_studio_caps_the_page_size(tmp_path):
    with fake_label_studio(project(23)) as ls:
        ls.page_cap = 5  # asked for LIST_PAGE_SIZE, answered 5 at a time: short pages are not the end
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.total, view.done) == (23, 23) and one_per_task(ls)
        assert ls.task_reads.count("id") == 5


def test_a_label_studio_that_ignores_include_still_gets_skips_right(tmp_path):
    with fake_label_studio(project(8)) as ls:
        ls.ignore_include = True
        ls.add_prediction(3, VERSION)
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.done, view.skipped) == (7, 1) and one_per_task(ls)
        assert "id,data,predictions" not in ls.task_reads  # every field came the first time


def test_predictions_listed_as_ids_are_looked_up_per_task(tmp_path):
    with fake_label_studio(project(6, predictions_as_ids=True)) as ls:
        ls.add_prediction(5, VERSION)
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.done, view.skipped) == (5, 1) and one_per_task(ls)


def test_a_restarted_runner_resumes_without_duplicates(tmp_path):
    with fake_label_studio(project(30)) as ls:
        settings = settings_for(ls, tmp_path, retry_initial_s=0.05, retry_max_s=0.05, write_batch=5)
        ls.lose_answers_after = 12  # stored, answer lost: the job cannot tell, until it looks

        async def first_life():
            runner = runner_for(settings)
            view = runner.submit("blobs", JobSpec(project=1))
            deadline = time.monotonic() + 20
            while runner.get("blobs", view.id).state != "paused" and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await runner.stop()  # the process goes away mid-job
            return runner.store.get(view.id)

        record = asyncio.run(first_life())
        assert record.state.value == "paused" and record.counts.get(TaskState.DONE, 0) >= 10
        assert 12 <= len(ls.predictions) < 30
        ls.lose_answers_after = None

        async def second_life():
            runner = runner_for(settings)
            assert await runner.start() == 1
            view = await runner.wait(record.id)
            await runner.stop()
            return view

        view = asyncio.run(second_life())
        assert (view.state, view.done, view.skipped, view.failed) == ("done", 30, 0, 0)
        assert one_per_task(ls) and len(ls.predictions) == 30


def test_unusable_tasks_fail_alone_with_their_reason(tmp_path):
    with fake_label_studio(project(8)) as ls:
        ls.add_task(9, None)  # its file is gone: 404
        ls.add_task(10, b"not an image at all")
        ls.add_task(11, None, data={"text": "no image key"})
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.state, view.done, view.failed) == ("done", 8, 3)
        reasons = {f["task"]: f["reason"] for f in view.failures}
        assert "404" in reasons[9] and "decode" in reasons[10] and "no 'image' field" in reasons[11]
        assert not ls.predictions_of(9) and not ls.predictions_of(10) and not ls.predictions_of(11)


def test_a_task_whose_prediction_is_over_the_answer_budget_fails_alone(tmp_path):
    brush = RECT_CONFIG.replace("RectangleLabels", "BrushLabels")
    ls = FakeLabelStudio(token=TOKEN, label_config=brush)
    for i in range(1, 5):
        ls.add_task(i, png_bytes(60, 40, (5, 5, 30, 30)))
    ls.add_task(5, png_bytes(600, 400, (5, 5, 595, 395)))  # one region too, but kilobytes of brush RLE
    with fake_label_studio(ls):
        settings = settings_for(ls, tmp_path)
        settings = settings.model_copy(update={"labelstudio": settings.labelstudio.model_copy(
            update={"max_answer_bytes": 4096})})
        view = run_job(settings, JobSpec(project=1))
    assert (view.state, view.done, view.failed) == ("done", 4, 1)
    assert "max_answer_bytes" in view.failures[0]["reason"] and view.failures[0]["task"] == 5
    assert not ls.predictions_of(5) and all(len(ls.predictions_of(t, VERSION)) == 1 for t in range(1, 5))


def test_an_image_host_hiccup_is_retried_and_a_dead_one_fails_its_task(tmp_path):
    with fake_label_studio(project(4)) as ls:
        ls.image_503s = {"2.png": 1, "3.png": 99}
        view = run_job(settings_for(ls, tmp_path), JobSpec(project=1))
        assert (view.state, view.done, view.failed) == ("done", 3, 1)
        assert view.failures == [{"task": 3, "reason": f"GET {ls.url}/data/upload/1/3.png answered 503 (3 tries)"}]
        assert len(ls.predictions_of(2, VERSION)) == 1


def test_label_studio_down_pauses_with_doubling_backoff_then_finishes(tmp_path):
    waits: list[float] = []
    with fake_label_studio(project(5)) as ls:
        states = []

        async def fake_sleep(seconds):
            waits.append(seconds)
            states.append(runner.get("blobs", job_id).state)
            if len(waits) == 4:
                ls.down = False
            await asyncio.sleep(0)

        async def go():
            nonlocal runner, job_id
            runner = runner_for(settings_for(ls, tmp_path, retry_initial_s=1.0, retry_max_s=3.0), sleep=fake_sleep)
            ls.down = True
            job_id = runner.submit("blobs", JobSpec(project=1)).id
            view = await runner.wait(job_id)
            await runner.stop()
            return view

        runner = job_id = None
        view = asyncio.run(go())
        assert waits == [1.0, 2.0, 3.0, 3.0] and set(states) == {"paused"}
        assert (view.state, view.done, view.reason) == ("done", 5, "")
        assert ls.max_in_flight <= 4  # labelstudio.jobs.max_ls_requests (image fetches counted too)


def test_label_studio_down_too_long_fails_the_job_with_the_reason(tmp_path):
    with fake_label_studio(project(3)) as ls:
        ls.down = True
        view = run_job(settings_for(ls, tmp_path, give_up_after_s=0.2), JobSpec(project=1))
        assert view.state == "failed" and "503" in view.reason and not ls.predictions


def test_a_refused_project_fails_at_once(tmp_path):
    with fake_label_studio(project(3)) as ls:
        settings = settings_for(ls, tmp_path)
        settings = settings.model_copy(update={"labelstudio": settings.labelstudio.model_copy(update={"api_key": "wrong"})})
        view = run_job(settings, JobSpec(project=1))
        assert view.state == "failed" and "401" in view.reason


def test_cancel_stops_a_job_and_it_is_not_resumed(tmp_path):
    with fake_label_studio(project(5)) as ls:
        settings = settings_for(ls, tmp_path)
        ls.down = True

        async def go():
            runner = runner_for(settings)
            job_id = runner.submit("blobs", JobSpec(project=1)).id
            while runner.get("blobs", job_id).state != "paused":
                await asyncio.sleep(0.01)
            view = await runner.cancel("blobs", job_id)
            seen = len(ls.requests)
            await asyncio.sleep(0.2)
            assert len(ls.requests) == seen  # nothing more is sent
            await runner.stop()
            again = runner_for(settings)
            assert await again.start() == 0
            await again.stop()
            return view

        view = asyncio.run(go())
        assert view.state == "cancelled" and view.finished_at is not None


def test_job_metrics_count_tasks_and_show_progress(tmp_path):
    before = sample("detserve_labelstudio_job_tasks_total", {"model": "blobs", "outcome": "done"})
    with fake_label_studio(project(7)) as ls:
        run_job(settings_for(ls, tmp_path), JobSpec(project=1))
    assert sample("detserve_labelstudio_job_tasks_total", {"model": "blobs", "outcome": "done"}) == before + 7
    assert sample("detserve_labelstudio_job_progress_ratio", {"model": "blobs"}) == 1.0
    assert sample("detserve_labelstudio_jobs_active", {"model": "blobs"}) == 0.0


# ---- the routes -----------------------------------------------------------------------------

def app_client(ls, tmp_path, **ls_fields) -> TestClient:
    settings = settings_for(ls, tmp_path)
    settings = settings.model_copy(update={"labelstudio": settings.labelstudio.model_copy(update=ls_fields)})
    return TestClient(build_inference_app(BlobEngine(), settings))


def wait_finished(client, job_id, auth=None) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = client.get(f"/labelstudio/blobs/jobs/{job_id}", auth=auth).json()
        if body["state"] in ("done", "failed", "cancelled"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {body}")


def test_job_routes_create_list_get_and_cancel(tmp_path):
    with fake_label_studio(project(15)) as ls, app_client(ls, tmp_path) as client:
        created = client.post("/labelstudio/blobs/jobs", json={"project": 1})
        assert created.status_code == 201, created.text
        job = wait_finished(client, created.json()["id"])
        assert (job["state"], job["done"], job["total"], job["model_version"]) == ("done", 15, 15, VERSION)
        listed = client.get("/labelstudio/blobs/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert client.delete(f"/labelstudio/blobs/jobs/{job['id']}").json()["state"] == "done"  # finished stays so
        assert one_per_task(ls)


def _nested_dict(depth: int) -> dict:
    out: dict = {"a": 1}
    for _ in range(depth):
        out = {"a": out}
    return out


@pytest.mark.parametrize("body, status, words", [
    ({}, 400, "project"),
    ({"project": "1"}, 400, "project"),
    ({"project": 0}, 400, "project"),
    ({"project": 1, "task_ids": []}, 400, "task_ids"),
    ({"project": 1, "task_ids": [1, -2]}, 400, "positive"),
    ({"project": 1, "task_ids": [1], "view": 3}, 400, "at most one"),
    ({"project": 1, "force": "yes"}, 400, "force"),
    ({"project": 1, "colour": "red"}, 400, "colour"),
    ({"project": 1, "task_ids": list(range(1, 102))}, 413, "max_task_ids"),
    ({"project": 1, "filters": {"items": ["x" * 300]}}, 413, "max_filter_bytes"),
    ({"project": 1, "filters": _nested_dict(300)}, 400, "nested too deeply"),
])
def test_bad_job_requests_are_4xx_with_the_reason(tmp_path, body, status, words):
    with fake_label_studio(project(1)) as ls:
        settings = settings_for(ls, tmp_path, max_task_ids=100, max_filter_bytes=256)
        with TestClient(build_inference_app(BlobEngine(), settings)) as client:
            resp = client.post("/labelstudio/blobs/jobs", json=body)
            assert resp.status_code == status and words in resp.json()["message"], resp.text


def test_unknown_model_and_job_are_404(tmp_path):
    with fake_label_studio(project(1)) as ls, app_client(ls, tmp_path) as client:
        assert client.post("/labelstudio/nope/jobs", json={"project": 1}).status_code == 404
        assert client.get("/labelstudio/blobs/jobs/0123456789abcdef").status_code == 404
        assert client.get("/labelstudio/blobs/jobs/../../x").status_code in (400, 404)
        assert client.get("/labelstudio/blobs/jobs/NOT-AN-ID").status_code == 400
        assert client.delete("/labelstudio/blobs/jobs/0123456789abcdef").status_code == 404


def test_job_routes_need_the_label_studio_basic_auth(tmp_path):
    with fake_label_studio(project(2)) as ls, \
            app_client(ls, tmp_path, basic_auth_user="ls", basic_auth_pass="pw") as client:
        assert client.post("/labelstudio/blobs/jobs", json={"project": 1}).status_code == 401
        assert client.get("/labelstudio/blobs/jobs").status_code == 401
        ok = client.post("/labelstudio/blobs/jobs", json={"project": 1}, auth=("ls", "pw"))
        assert ok.status_code == 201
        assert wait_finished(client, ok.json()["id"], auth=("ls", "pw"))["done"] == 2


def test_tasks_created_webhook_queues_a_job_only_for_opted_in_projects(tmp_path):
    with fake_label_studio(project(0)) as ls:
        settings = settings_for(ls, tmp_path, on_import_projects=[1])
        with TestClient(build_inference_app(BlobEngine(), settings)) as client:
            for i in range(1, 51):
                ls.add_task(i, png_bytes(60, 40, (5, 5, 30, 30)))
            event = {"action": "TASKS_CREATED", "tasks": [{"id": i, "data": {}} for i in range(1, 51)],
                     "project": {"id": 1, "title": "x"}}
            queued = client.post("/labelstudio/blobs/webhook", json=event)
            assert queued.status_code == 201 and queued.json()["status"] == "ok"
            job = wait_finished(client, queued.json()["job"])
            assert (job["state"], job["done"], job["origin"]) == ("done", 50, "on_import")
            assert one_per_task(ls)
            other = client.post("/labelstudio/blobs/webhook", json={**event, "project": {"id": 2}})
            assert (other.status_code, other.json()) == (200, {"status": "Unknown event"})
            for tasks in ([{"id": "x"}], [{"id": 2**63}], [{"id": 2**64 - 1}]):  # SQLite holds signed 64-bit ids
                bad = client.post("/labelstudio/blobs/webhook", json={**event, "tasks": tasks})
                assert bad.status_code == 400, (tasks, bad.text)


# ---- the command line -----------------------------------------------------------------------

@pytest.mark.slow
def test_annotate_command_runs_the_job_in_process_and_prints_a_summary(tmp_path, monkeypatch, capsys):
    import json

    from fakes import write_model

    from service.cli import main

    write_model(tmp_path / "store", "nullnet")
    config = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="a"/><Label value="b"/></RectangleLabels></View>"""
    with fake_label_studio(project(12)) as ls:
        ls.label_config = config
        monkeypatch.setenv("DETSERVE_LABELSTUDIO__JOBS__STORE_PATH", str(tmp_path / "jobs.sqlite3"))
        argv = ["annotate", "--label-studio", ls.url, "--api-key", TOKEN, "--project", "1", "--model", "nullnet",
                "--model-store", str(tmp_path / "store")]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["state"], summary["done"], summary["failed"]) == ("done", 12, 0)
        version = summary["model_version"]
        assert all(len(ls.predictions_of(t, version)) == 1 for t in ls.tasks)
        assert main(argv + ["--quiet"]) == 0  # a second run skips everything
        assert json.loads(capsys.readouterr().out)["skipped"] == 12
