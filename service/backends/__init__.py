"""Backends run the network; `create_backend` picks one from `ModelConfig.backend`.

Each backend module is imported only when chosen, so a worker running ONNX Runtime never builds
the PyTorch detector and an eager worker never imports onnxruntime.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..settings import BackendKind, ModelConfig

if TYPE_CHECKING:
    from .base import Backend


def create_backend(cfg: ModelConfig, device: str, **options: Any) -> "Backend":
    """An unloaded backend for `cfg` on `device` ("cpu", "cuda:N"); call `load()` next.

    `options` go to the backend's constructor (the eager backend takes a pre-read `checkpoint`).
    """
    if cfg.backend == BackendKind.EAGER:
        from .eager import EagerBackend

        return EagerBackend(cfg, device, **options)
    if cfg.backend == BackendKind.ONNXRUNTIME:
        try:
            from .onnxrt import OnnxRuntimeBackend
        except ModuleNotFoundError as exc:
            if exc.name in ("service.backends.onnxrt", "onnxruntime"):
                raise ConfigError(f"model {cfg.name!r}: backend 'onnxruntime' is not available: {exc}") from None
            raise
        return OnnxRuntimeBackend(cfg, device, **options)
    if cfg.backend == BackendKind.AUTO:
        # Resolving "auto" needs the checkpoint and a cache (service/backends/auto.py): the Predictor does it.
        raise ConfigError(f"model {cfg.name!r}: backend 'auto' is resolved by Predictor.from_config, "
                          "not by create_backend; pass a config with backend 'eager' or 'onnxruntime'")
    raise ConfigError(f"model {cfg.name!r}: field 'backend': unknown backend {cfg.backend!r}")
