"""Shared-memory payloads between the front process and one worker.

Pickling an image into the socketpair costs a pickle copy, two kernel copies and an unpickle copy,
and it was the largest single cost of the front process with the null model (15% of its CPU in
`os.write` for a 265 KB JPEG at c16, py-spy). Instead the front writes each large payload once into
an arena, a memfd shared with that worker, and the request carries `ArenaBytes(offset, length)`.

A worker runs one batch at a time (the pool never sends a second before the first is answered), so
the arena needs no allocator: each batch is laid out from offset 0 and the arena is free again once
that batch's result arrives. A payload that does not fit, or any payload while the arena is still
held by an unanswered batch, simply travels inline as before.

memfd is used rather than multiprocessing.shared_memory: it has no name to leak in /dev/shm when a
process is killed, needs no resource-tracker process, is not capped by a container's small /dev/shm,
and its pages are only committed when written. The worker opens it through /proc/<front pid>/fd/<n>.
"""
from __future__ import annotations

import dataclasses
import logging
import mmap
import os

from ..pipeline.tiling import TileImage
from ..types import EncodedImage, RawImage
from .messages import ArenaBytes, ArenaSpec, BatchRequest, WorkItem

log = logging.getLogger("detserve.engine")

# Below this a payload is cheaper to pickle than to reference (the reference costs ~100 bytes of pickle).
MIN_SHARED_BYTES = 16 * 1024
DEFAULT_ARENA_BYTES = 64 * 1024 * 1024  # virtual size; only the pages a batch writes are committed


class FrontArena:
    """The front's side: owns the memfd and lays out one batch at a time."""

    def __init__(self, size: int = DEFAULT_ARENA_BYTES):
        self.size = size
        self.fd = os.memfd_create("detserve-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.batch_id: int | None = None  # the unanswered batch whose payloads the arena holds

    @classmethod
    def create(cls, size: int = DEFAULT_ARENA_BYTES) -> "FrontArena | None":
        """None where memfd is unavailable (not Linux, or a sandbox forbids it): payloads go inline."""
        if not hasattr(os, "memfd_create"):
            return None
        try:
            return cls(size)
        except OSError as exc:
            log.warning("shared-memory payloads disabled, images are pickled to workers: %s", exc)
            return None

    def spec(self) -> ArenaSpec:
        return ArenaSpec(f"/proc/{os.getpid()}/fd/{self.fd}", self.size)

    def place(self, request: BatchRequest) -> BatchRequest:
        """`request` with its large payloads moved into the arena (or unchanged when it is busy)."""
        if self.batch_id is not None:
            return request
        offset, items, moved = 0, [], False
        placed: dict[int, ArenaBytes] = {}  # id(payload) -> where it went: the tiles of one image share it
        for item in request.items:
            data = _payload(item.image)
            tile = isinstance(item.image, TileImage)
            ref = placed.get(id(data)) if tile else None
            if ref is None and data is not None and len(data) >= MIN_SHARED_BYTES and offset + len(data) <= self.size:
                ref = ArenaBytes(offset, len(data))
                if tile:
                    placed[id(data)] = ref
                self._map[offset:offset + len(data)] = data
                offset += len(data)
            if ref is not None:
                item = WorkItem(item.item_id, _with_payload(item.image, ref), item.options)
                moved = True
            items.append(item)
        if not moved:
            return request
        self.batch_id = request.batch_id
        return dataclasses.replace(request, items=tuple(items))

    def release(self, batch_id: int) -> None:
        if self.batch_id == batch_id:
            self.batch_id = None

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class WorkerArena:
    """The worker's side: maps the front's memfd and turns references back into bytes."""

    def __init__(self, spec: ArenaSpec):
        fd = os.open(spec.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, spec.size)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, spec: ArenaSpec | None) -> "WorkerArena | None":
        if spec is None:
            return None
        try:
            return cls(spec)
        except OSError:
            return None  # WorkerReady.arena_mapped = False: the front keeps sending bytes inline

    def resolve(self, request: BatchRequest) -> BatchRequest:
        """Copy referenced payloads out of the arena: decoders get plain bytes and the arena is never
        read after the result is sent (the front reuses it for the next batch)."""
        items = []
        copies: dict[ArenaBytes, bytes] = {}  # one copy per payload, however many tiles reference it
        for item in request.items:
            data = _payload(item.image)
            if isinstance(data, ArenaBytes):
                payload = copies.get(data)
                if payload is None:
                    payload = copies[data] = self._map[data.offset:data.offset + data.length]
                item = WorkItem(item.item_id, _with_payload(item.image, payload), item.options)
            items.append(item)
        return dataclasses.replace(request, items=tuple(items))


def _payload(image):
    if isinstance(image, TileImage):
        return _payload(image.source)
    if isinstance(image, EncodedImage):
        return image.data
    if isinstance(image, RawImage):
        return image.pixels
    return None


def _with_payload(image, payload):
    if isinstance(image, TileImage):
        return dataclasses.replace(image, source=_with_payload(image.source, payload))
    if isinstance(image, EncodedImage):
        return EncodedImage(payload)
    return dataclasses.replace(image, pixels=payload)
