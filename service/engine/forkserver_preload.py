"""What the forkserver imports once before it forks worker processes (process.py `worker_context`).

Never imported by the front process: importing this module imports torch. Each worker forked from the
forkserver starts with torch (and OpenCV) already imported, and the pages that import wrote are shared
copy-on-write instead of written again by every worker: bundled rtmdet, two workers, PSS of the
forkserver plus both workers 1151 MB against 1400 MB for two spawned workers (2026-12-04,
bench/analysis.md "Worker memory").

The forkserver must stay single-threaded to fork safely: with one OpenMP thread numpy's OpenBLAS, torch
and OpenCV start no threads at import (ONNX Runtime starts one, so workers import it themselves).
Environment read when those libraries load is fixed here, before the imports: idle OpenMP threads sleep
(worker.py `set_thread_env` says why) and pools start at one thread; each worker then sets its own
thread count, and takes the front's environment for everything read later (worker_main).
"""
import os
import signal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
# A group-wide SIGTERM (systemd, `kill -- -PGID`) must not end the forkserver while the front drains:
# workers' exit statuses come through it, and a restart without it first waits for a new one to import
# torch. It exits once the front and every worker are gone (each holds its end of the alive pipe).
signal.signal(signal.SIGTERM, signal.SIG_IGN)

import cv2  # noqa: E402,F401
import torch  # noqa: E402,F401
