"""detserve clients: `AsyncDetserveClient` holds the logic once; `DetserveClient` runs it on a
private event loop for synchronous code. Both return service.types and raise service.errors.

    with DetserveClient(url="http://localhost:8080") as client:      # or grpc="localhost:7070"
        result = client.detect(open("cat.jpg", "rb").read(), model="rtmdet", score_thr=0.4)
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from .. import errors
from ..types import DetectOptions, DetectResult, EncodedImage, ImageInput, MaskFormat, ModelInfo, TileMerge
from .transports import CallOptions, GrpcTransport, RestTransport

T = TypeVar("T")

# Retried: the queue was full (429 / RESOURCE_EXHAUSTED) or the server could not take the call
# right now (503 / UNAVAILABLE). Everything else is the caller's to handle.
RETRYABLE = (errors.Overloaded, errors.ModelNotReady, errors.WorkerDied)


def _as_image(image: bytes | ImageInput) -> ImageInput:
    return EncodedImage(image) if isinstance(image, (bytes, bytearray, memoryview)) else image


class AsyncDetserveClient:
    def __init__(
        self,
        url: str | None = None,
        *,
        grpc: str | None = None,
        management_url: str | None = None,
        model: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        token: str | None = None,
    ):
        if (url is None) == (grpc is None):
            raise ValueError("give exactly one of url='http://host:8080' or grpc='host:7070'")
        self._transport = RestTransport(url, management_url) if url is not None else GrpcTransport(grpc)
        self.default_model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.token = token

    async def __aenter__(self) -> AsyncDetserveClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    def _call(self, timeout_s: float | None) -> CallOptions:
        return CallOptions(timeout_s=timeout_s or self.timeout_s, token=self.token)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Exponential backoff with jitter; a server's Retry-After is the least we wait."""
        for tries in range(self.retries + 1):
            try:
                return await attempt()
            except RETRYABLE as err:
                if tries == self.retries:
                    raise
                delay = min(self.max_backoff_s, self.backoff_s * 2**tries) * (0.5 + random.random() / 2)
                await asyncio.sleep(max(delay, err.retry_after_s or 0.0))
        raise AssertionError("unreachable")

    def _model(self, model: str | None) -> str:
        model = model or self.default_model
        if not model and isinstance(self._transport, RestTransport):
            raise errors.InvalidRequest("REST detection needs a model name: pass model=... to the call or client")
        return model or ""  # gRPC: the server picks its default model

    async def detect_batch(
        self,
        images: Sequence[bytes | ImageInput],
        *,
        model: str | None = None,
        score_thr: float | None = None,
        max_dets: int | None = None,
        classes: Sequence[str] | None = None,
        iou_thr: float | None = None,
        class_agnostic: bool | None = None,
        mask_format: MaskFormat | str | None = None,
        tile: int | str | None = None,
        tile_overlap: float | None = None,
        tile_merge: TileMerge | str | None = None,
        timeout_s: float | None = None,
    ) -> list[DetectResult]:
        """One result per image, in order (one call: the server batches the images with other traffic).
        Boxes come back xyxy in original pixels; write them in another format with
        `service.protocols.render.box_to` (what the server's doors use for `box_format` / `normalized`)."""
        options = DetectOptions(
            score_thr=score_thr, max_dets=max_dets, classes=tuple(classes) if classes else None, iou_thr=iou_thr,
            class_agnostic=class_agnostic, mask_format=MaskFormat(mask_format) if mask_format else None,
            tile=tile, tile_overlap=tile_overlap, tile_merge=TileMerge(tile_merge) if tile_merge else None,
        )
        inputs, name, call = [_as_image(i) for i in images], self._model(model), self._call(timeout_s)
        return await self._retrying(lambda: self._transport.detect(name, inputs, options, call))

    async def detect(self, image: bytes | ImageInput, *, model: str | None = None, **knobs) -> DetectResult:
        """`detect_batch` for one image; takes the same keyword arguments."""
        results = await self.detect_batch([image], model=model, **knobs)
        return results[0]

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        call = self._call(timeout_s)
        return await self._retrying(lambda: self._transport.list_models(call))

    async def model_info(self, model: str | None = None, *, timeout_s: float | None = None) -> ModelInfo:
        name, call = model or self.default_model or "", self._call(timeout_s)
        return await self._retrying(lambda: self._transport.model_info(name, call))

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """True when the server is ready to serve every configured model."""
        return await self._transport.health(self._call(timeout_s))


class DetserveClient:
    """The synchronous face of AsyncDetserveClient: same arguments, same methods, same results.
    It owns an event loop, so use it from synchronous code (use the async client inside a loop)."""

    def __init__(self, url: str | None = None, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._async = self._loop.run_until_complete(self._create(url, kwargs))

    @staticmethod
    async def _create(url, kwargs) -> AsyncDetserveClient:
        return AsyncDetserveClient(url, **kwargs)  # built inside the loop its channels bind to

    def _run(self, awaitable: Awaitable[T]) -> T:
        return self._loop.run_until_complete(awaitable)

    def detect(self, image, **kwargs) -> DetectResult:
        return self._run(self._async.detect(image, **kwargs))

    def detect_batch(self, images, **kwargs) -> list[DetectResult]:
        return self._run(self._async.detect_batch(images, **kwargs))

    def list_models(self, **kwargs) -> list[ModelInfo]:
        return self._run(self._async.list_models(**kwargs))

    def model_info(self, model: str | None = None, **kwargs) -> ModelInfo:
        return self._run(self._async.model_info(model, **kwargs))

    def health(self, **kwargs) -> bool:
        return self._run(self._async.health(**kwargs))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._async.close())
            self._loop.close()

    def __enter__(self) -> DetserveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
