"""In-process throughput of one backend: the whole Predictor (preprocess, network, postprocess) on
fixed batches of generated images, for the eager vs ONNX Runtime table in docs/benchmarks.md."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..settings import BackendKind, ModelConfig
from ..types import DetectOptions, RawImage
from .parity import onnx_config, shape_images


def measure_backend_throughput(cfg: ModelConfig, backend: str, batch_size: int, seconds: float = 5.0, *,
                               device: str = "cpu", threads: int | None = None, warmup: int = 2) -> float:
    """Images per second for `backend` ("eager" | "onnxruntime") at a fixed batch size.

    For "onnxruntime" the model's configured ONNX file is used when it exists, else a network-only
    export goes to a temporary folder (the model folder is left untouched).
    """
    from ..pipeline.predictor import Predictor

    kind = BackendKind(backend)
    with tempfile.TemporaryDirectory(prefix="detserve-throughput-") as tmp:
        run_cfg = cfg.model_copy(update={"backend": kind, "device": device})
        if kind == BackendKind.ONNXRUNTIME:
            path = cfg.path(cfg.onnxruntime.model)
            end2end = cfg.onnxruntime.end2end
            if not path.is_file():
                from .onnx_export import export_onnx

                path, end2end = export_onnx(cfg, out=Path(tmp) / "model.onnx").path, False
            providers = None if device.startswith("cuda") else ["cpu"]
            run_cfg = onnx_config(run_cfg, path, end2end=end2end, providers=providers)
        images = shape_images(batch_size, seed=11)
        inputs = [RawImage(pixels=i.tobytes(), height=i.shape[0], width=i.shape[1], channel_order="BGR") for i in images]
        options = [DetectOptions()] * batch_size
        predictor = Predictor.from_config(run_cfg, device=device, threads=threads)
        try:
            for _ in range(warmup):
                predictor.predict(inputs, options)
            done, start = 0, time.perf_counter()
            while True:
                predictor.predict(inputs, options)
                done += batch_size
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    return done / elapsed
        finally:
            predictor.close()
