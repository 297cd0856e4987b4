"""Tiled requests in the engine: an image that is tiled becomes one queue item per tile (plus the full
pass), so its tiles batch with each other and with other traffic, and queue limits count tiles.

The front only reads image headers to plan (service/pipeline/tiling.py); workers decode, crop and map
each tile's detections back to original pixels; the front merges once every tile of an image is back.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .. import errors
from ..pipeline.tile_merge import merge_image
from ..pipeline.tiling import TilePlan, plan_tiles, tile_images, tile_options
from ..settings import ModelConfig
from ..types import DetectOptions, DetectResult, ImageInput


@dataclass(frozen=True, slots=True)
class ImageWork:
    """One image of a request: what its queue items carry (the image itself, or its tiles)."""

    plan: TilePlan | None  # None: detected whole, as before tiling existed
    inputs: tuple[ImageInput, ...]
    options: DetectOptions  # what each item runs with


def expand(images: Sequence[ImageInput], options: DetectOptions, cfg: ModelConfig, input_size: int) -> list[ImageWork]:
    """Plan every image of a request; raises InvalidRequest / PayloadTooLarge before anything is queued."""
    out = []
    for image in images:
        plan = plan_tiles(image, options, cfg.tiling, input_size=input_size, max_pixels=cfg.max_image_pixels)
        if plan is None:
            out.append(ImageWork(None, (image,), options))
            continue
        if options.render is not None:
            # Drawing needs the decoded full image, which only workers hold; not built yet.
            raise errors.InvalidRequest("render is not available together with tiling; ask for the detections "
                                        "(or tile=off) and draw them client-side")
        key = uuid.uuid4().hex  # the worker's decode-cache key: unique per request and image
        out.append(ImageWork(plan, tuple(tile_images(image, plan, key)), tile_options(options)))
    return out


def item_count(work: Sequence[ImageWork]) -> int:
    return sum(len(w.inputs) for w in work)


async def assemble(work: Sequence[ImageWork], outcomes: Sequence[DetectResult], options: DetectOptions,
                   max_dets: int) -> list[DetectResult]:
    """Item outcomes (all DetectResults, in item order) -> one result per image, tiles merged."""
    results: list[DetectResult] = []
    position = 0
    for w in work:
        mine = outcomes[position:position + len(w.inputs)]
        position += len(w.inputs)
        if w.plan is None:
            results.append(mine[0])
            continue
        # Merging is numpy and pycocotools work over every tile's detections (tens of ms for a few
        # thousand); in a thread, so one large image never stalls the event loop serving everyone else.
        results.append(await asyncio.to_thread(merge_image, w.plan, mine, options, max_dets=max_dets))
    return results
