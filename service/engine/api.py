"""The protocol-neutral engine API that every door calls. Adapters type against `EngineAPI`.

The implementation (`service.engine.engine.Engine`) owns one scheduler queue per model and a
worker pool; an inline mode runs the same code without processes for tests.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..types import DetectOptions, DetectResult, ImageInput, ModelInfo, Priority
from ..types import Protocol as Door


class EngineAPI(Protocol):
    async def detect(
        self,
        model: str,
        images: Sequence[ImageInput],
        options: DetectOptions = DetectOptions(),
        *,
        protocol: Door = Door.REST,
        request_id: str | None = None,
        timeout_s: float | None = None,
        priority: Priority = Priority.NORMAL,
    ) -> list[DetectResult]:
        """One result per image, in order. Each image is its own scheduler item, so a multi-image
        call batches with other traffic; LOW priority items only fill what NORMAL ones leave. Raises a DetserveError subclass (the first failing
        image's error) on failure; never returns a partial list."""
        ...

    def live(self) -> bool: ...

    def ready(self) -> bool:
        """True once every configured model has at least one live worker."""
        ...

    def model_ready(self, model: str) -> bool: ...

    def has_model(self, model: str) -> bool:
        """Whether `model` is loaded; cheap (metric labels ask on every request)."""
        ...

    def models(self) -> list[ModelInfo]: ...

    def model_info(self, model: str) -> ModelInfo:
        """Raises ModelNotFound."""
        ...

    async def load_model(self, name: str, *, workers: int | None = None) -> ModelInfo: ...

    async def unload_model(self, name: str) -> None:
        """Stop accepting, drain in-flight requests, stop the workers."""
        ...

    async def scale_workers(self, name: str, count: int) -> ModelInfo: ...

    async def set_batch_settings(
        self,
        name: str,
        *,
        max_batch_size: int | None = None,
        max_batch_delay_ms: float | None = None,
        max_queue_size: int | None = None,
        request_timeout_ms: float | None = None,
    ) -> ModelInfo: ...
