"""Shared-memory payloads (service/engine/arena.py): layout, fallback to inline, and the round trip."""
from __future__ import annotations

import os

import pytest

from service.engine.arena import MIN_SHARED_BYTES, FrontArena, WorkerArena
from service.engine.messages import ArenaBytes, BatchRequest, WorkItem
from service.types import DetectOptions, EncodedImage, RawImage

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd is Linux-only")


def batch(batch_id: int, *images) -> BatchRequest:
    return BatchRequest(batch_id, tuple(WorkItem(i, img, DetectOptions()) for i, img in enumerate(images)))


def payloads(request: BatchRequest) -> list:
    return [item.image.data if isinstance(item.image, EncodedImage) else item.image.pixels for item in request.items]


def test_large_payloads_travel_by_reference_and_come_back_identical():
    front = FrontArena(1 << 20)
    try:
        big, small = os.urandom(200_000), b"x" * 100
        raw = RawImage(os.urandom(96 * 96 * 3), 96, 96, "BGR")
        request = batch(7, EncodedImage(big), EncodedImage(small), raw)
        placed = front.place(request)
        kinds = [type(p) for p in payloads(placed)]
        assert kinds == [ArenaBytes, bytes, ArenaBytes]  # the small one stays inline
        assert front.batch_id == 7
        resolved = WorkerArena(front.spec()).resolve(placed)
        assert payloads(resolved) == [big, small, raw.pixels]
        assert resolved.items[2].image.height == 96 and resolved.items[2].image.channel_order == "BGR"
    finally:
        front.close()


def test_a_held_arena_or_an_oversized_payload_falls_back_to_inline_bytes():
    front = FrontArena(1 << 20)
    try:
        first = front.place(batch(1, EncodedImage(os.urandom(MIN_SHARED_BYTES))))
        assert isinstance(payloads(first)[0], ArenaBytes)
        # batch 1 is unanswered: batch 2 must not overwrite its bytes
        second = front.place(batch(2, EncodedImage(b"y" * MIN_SHARED_BYTES)))
        assert payloads(second) == [b"y" * MIN_SHARED_BYTES]
        front.release(2)  # an answer for another batch frees nothing
        assert front.batch_id == 1
        front.release(1)
        huge = os.urandom((1 << 20) + 1)
        fits = os.urandom(600_000)
        third = front.place(batch(3, EncodedImage(fits), EncodedImage(huge), EncodedImage(fits)))
        assert [type(p) for p in payloads(third)] == [ArenaBytes, bytes, bytes]  # 2 x 600 KB > 1 MiB
    finally:
        front.close()


def test_tiles_of_one_image_write_its_payload_once_and_resolve_to_one_copy():
    from service.pipeline.tiling import TileImage, TileWindow

    front = FrontArena(1 << 20)
    try:
        source = EncodedImage(os.urandom(400_000))  # 3 copies of it would not fit the 1 MiB arena
        tiles = [TileImage(source, "k", TileWindow(x, 0, x + 10, 10), 100, 10) for x in (0, 40, 80)]
        placed = front.place(batch(3, *tiles, EncodedImage(os.urandom(400_000))))
        refs = [item.image.source.data if isinstance(item.image, TileImage) else item.image.data
                for item in placed.items]
        assert refs[0] == refs[1] == refs[2] == ArenaBytes(0, 400_000) and refs[3] == ArenaBytes(400_000, 400_000)
        resolved = WorkerArena(front.spec()).resolve(placed)
        datas = [item.image.source.data for item in resolved.items[:3]]
        assert datas[0] == source.data and datas[0] is datas[1] is datas[2]
        assert [item.image.window for item in resolved.items[:3]] == [t.window for t in tiles]
    finally:
        front.close()
