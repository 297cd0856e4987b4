"""The ceiling: the same images through Predictor.predict in this process, no serving layer.

Closed-loop semantics match the served runs: `concurrency` clients each keep one image
outstanding; one model instance takes up to `max_batch_size` of the waiting images at a time (what
the engine's dynamic batcher does with an idle worker and a zero batch delay). A client's latency
runs from the moment it (virtually) submitted to the end of the batch that carried its image, so
queueing behind a full batch is counted exactly as a served client would feel it.
"""
from __future__ import annotations

import sys
import time
from collections import deque

from ..types import DetectOptions, DetectResult, EncodedImage
from .stats import RunResult, summarize


def run_in_process(predictor, corpus: list[bytes], *, concurrency: int, max_batch_size: int,
                   requests: int | None = None, duration_s: float | None = 10.0, warmup_s: float = 2.0,
                   label: str = "", progress: bool = True) -> RunResult:
    if requests is None and duration_s is None:
        raise ValueError("give requests or duration_s")
    images = [EncodedImage(data) for data in corpus]
    options = DetectOptions()
    waiting: deque[tuple[int, float]] = deque()  # (image index, submitted at)
    counter = 0
    now = time.perf_counter()
    for _ in range(concurrency):
        waiting.append((counter, now))
        counter += 1
    measure_start = now + warmup_s
    deadline = measure_start + duration_s if duration_s is not None else float("inf")
    latencies: list[float] = []
    codes: list[str] = []
    stage_sums = {"decode": 0.0, "preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
    batches = 0
    last_done = measure_start
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=requests, desc=label or "in-process", unit="img", file=sys.stderr, leave=False, mininterval=0.5)
    started_measured = 0
    while waiting:
        take = min(max_batch_size, len(waiting))
        batch = [waiting.popleft() for _ in range(take)]
        batch_images = [images[i % len(images)] for i, _ in batch]
        results = predictor.predict(batch_images, [options] * take)
        done = time.perf_counter()
        measured_batch = False
        for (_, submitted), result in zip(batch, results):
            if submitted < measure_start:
                continue
            measured_batch = True
            ok = isinstance(result, DetectResult)
            codes.append("ok" if ok else type(result).__name__)
            if ok:
                latencies.append(done - submitted)
                if result.times is not None:
                    for key in stage_sums:
                        stage_sums[key] += getattr(result.times, key, 0.0) or 0.0
            last_done = done
        batches += measured_batch
        if bar is not None and measured_batch:
            bar.update(sum(1 for _, s in batch if s >= measure_start))
        # each finished client submits its next image now, unless the window is over
        for _ in batch:
            if done >= deadline or (requests is not None and started_measured >= requests):
                continue
            if done >= measure_start:
                started_measured += 1
            waiting.append((counter, done))
            counter += 1
    if bar is not None:
        bar.close()
    result = summarize(label or "in-process", "in-process", latencies, codes, last_done - measure_start,
                       concurrency=concurrency)
    n = max(1, len(latencies))
    result.extra = {
        "max_batch_size": max_batch_size,
        "mean_batch": round(len(codes) / max(1, batches), 2),
        "stage_ms": {k: round(v / n * 1000, 3) for k, v in stage_sums.items()},
        "backend": getattr(predictor, "backend_name", "?"),
    }
    return result
