"""`detserve annotate`: pre-annotate a Label Studio project from a shell.

The same job as POST /labelstudio/{model}/jobs, run either in this process (an engine of its own,
job state in the usual job store, so a second run skips what the first one wrote) or by a running
server (`--server`), polled until it ends. Prints a progress bar on stderr and a JSON summary on
stdout; exits 0 when the job is done (even with failed tasks), 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

POLL_S = 0.5


def register(subparsers) -> None:
    p = subparsers.add_parser("annotate", help="pre-annotate a Label Studio project (a background job, run here or on a server)")
    p.add_argument("--label-studio", metavar="URL", help="Label Studio base URL (default: LABEL_STUDIO_URL; "
                   "with --server the server's own labelstudio.url is used)")
    p.add_argument("--api-key", help="Label Studio API key (default: LABEL_STUDIO_API_KEY)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--model", required=True, help="detserve model name")
    p.add_argument("--task-ids", help="comma-separated task ids (default: every task of the project)")
    p.add_argument("--view", type=int, help="a Data Manager view (tab) id whose filters pick the tasks")
    p.add_argument("--force", action="store_true", help="re-predict tasks that already hold a prediction of this model version")
    p.add_argument("--server", metavar="URL", help="run the job on this detserve server instead of in-process")
    p.add_argument("--basic-auth", metavar="USER:PASS", help="the server's Label Studio Basic auth (with --server)")
    p.add_argument("--token", help="the server's bearer token (with --server)")
    p.add_argument("--config", help="server settings TOML file (in-process)")
    p.add_argument("--model-store", help="model store folder (in-process; default: models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidRequest

    body: dict = {"project": args.project, "force": args.force}
    if args.task_ids:
        try:
            body["task_ids"] = [int(t) for t in args.task_ids.split(",") if t.strip()]
        except ValueError:
            raise InvalidRequest("--task-ids must be comma-separated integers") from None
    if args.view is not None:
        body["view"] = args.view
    progress = None if args.quiet else _Progress()
    view = _on_server(args, body, progress) if args.server else asyncio.run(_in_process(args, body, progress))
    if progress:
        progress.close()
    print(json.dumps({k: view[k] for k in ("id", "state", "reason", "total", "done", "skipped", "failed",
                                           "model_version", "failures")}, indent=2))
    return 0 if view["state"] == "done" else 1


async def _in_process(args: argparse.Namespace, body: dict, progress) -> dict:
    from ..engine.engine import Engine
    from ..protocols.labelstudio.jobs import JobRunner, default_store_path, parse_job_request
    from ..protocols.labelstudio.jobstore import JobStore
    from ..settings import load_server_settings

    overrides: dict = {"models": [args.model]}
    if args.model_store:
        overrides["model_store"] = args.model_store
    settings = load_server_settings(args.config, **overrides)
    ls_fields = {}
    if args.label_studio or os.environ.get("LABEL_STUDIO_URL"):
        ls_fields["url"] = args.label_studio or os.environ["LABEL_STUDIO_URL"]
    if args.api_key:
        ls_fields["api_key"] = args.api_key
    if ls_fields:
        settings = settings.model_copy(update={"labelstudio": settings.labelstudio.model_copy(update=ls_fields)})
    spec = parse_job_request(body, settings.labelstudio.jobs, origin="cli")
    engine = Engine(settings)
    await engine.start()
    store = JobStore(default_store_path(settings))
    runner = JobRunner(engine, settings, store)
    try:
        job = runner.submit(args.model, spec)
        waiter = asyncio.ensure_future(runner.wait(job.id))
        while not waiter.done():
            if progress:
                progress.show(runner.get(args.model, job.id).to_json())
            await asyncio.wait([waiter], timeout=POLL_S)
        return waiter.result().to_json()
    finally:
        await runner.stop()
        store.close()
        await engine.stop(5)


def _on_server(args: argparse.Namespace, body: dict, progress) -> dict:
    import httpx

    from ..errors import InvalidRequest, UpstreamRefused

    auth = None
    if args.basic_auth:
        user, sep, password = args.basic_auth.partition(":")
        if not sep:
            raise InvalidRequest("--basic-auth must be USER:PASS")
        auth = (user, password)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = f"{args.server.rstrip('/')}/labelstudio/{args.model}/jobs"
    with httpx.Client(auth=auth, headers=headers, timeout=30, trust_env=False) as client:
        resp = client.post(base, json=body)
        if resp.status_code != 201:
            raise UpstreamRefused(f"POST {base} answered {resp.status_code}: {resp.text[:300]}")
        view = resp.json()
        try:
            while view["state"] not in ("done", "failed", "cancelled"):
                if progress:
                    progress.show(view)
                time.sleep(POLL_S)
                view = client.get(f"{base}/{view['id']}").json()
        except KeyboardInterrupt:
            view = client.delete(f"{base}/{view['id']}").json()  # Ctrl-C stops the job, not just the watching
    return view


class _Progress:
    """One line on stderr, redrawn: [#####.....] 412/2000 done 400 skipped 10 failed 2  38.1/s  ETA 42 s"""

    WIDTH = 30

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, view: dict) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < 5:  # a log file gets a line every 5 s, not a redraw
            return
        self.last = now
        total = view["total"] or 0
        finished = view["done"] + view["skipped"] + view["failed"]
        filled = int(self.WIDTH * finished / total) if total else 0
        rate = f"{view['rate_per_s']:.1f}/s" if view.get("rate_per_s") else "-/s"
        eta = f"ETA {view['eta_s']:.0f} s" if view.get("eta_s") is not None else ""
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {finished}/{total}{'' if view['listed'] else '+'} "
                f"done {view['done']} skipped {view['skipped']} failed {view['failed']}  {rate}  {eta}  {view['state']}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
