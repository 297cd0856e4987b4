"""`detserve predict --url http://host:8080 IMAGE...` / `--grpc host:7070`: predict through a
running server with the Python client instead of loading the model locally.

`service/commands/predict.py` calls `add_remote_arguments(parser)` when building its parser and
uses `remote_detector(args)` as its detector when `wants_remote(args)`; its output stays the same.
"""
from __future__ import annotations

import argparse
import atexit
from collections.abc import Sequence

from ..errors import DetserveError
from ..types import DetectOptions, DetectResult, ImageInput
from .client import DetserveClient


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    endpoint = parser.add_mutually_exclusive_group()
    endpoint.add_argument("--url", help="predict through a running server's inference API, e.g. http://localhost:8080")
    endpoint.add_argument("--grpc", metavar="HOST:PORT", help="predict through a running server's gRPC API, e.g. localhost:7070")
    parser.add_argument("--token", help="with --url/--grpc: bearer token for a server with token auth")
    parser.add_argument("--timeout", type=float, default=30.0, help="with --url/--grpc: seconds per request (default 30)")


def wants_remote(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "url", None) or getattr(args, "grpc", None))


def remote_detector(args: argparse.Namespace):
    """predict's `Detector` (images, options -> one result or typed error per image) backed by one
    client, so every image of the run reuses the connection."""
    client = DetserveClient(getattr(args, "url", None), grpc=getattr(args, "grpc", None),
                            model=getattr(args, "model", None), timeout_s=getattr(args, "timeout", 30.0),
                            token=getattr(args, "token", None))
    atexit.register(client.close)

    def detect(images: Sequence[ImageInput], options: DetectOptions) -> list[DetectResult | DetserveError]:
        try:
            return client.detect_batch(images, score_thr=options.score_thr, max_dets=options.max_dets,
                                       classes=options.classes, iou_thr=options.iou_thr,
                                       class_agnostic=options.class_agnostic, mask_format=options.mask_format,
                                       tile=options.tile, tile_overlap=options.tile_overlap,
                                       tile_merge=options.tile_merge)
        except DetserveError as err:  # one image per call in predict, so the error is that image's
            return [err] * len(images)

    return detect
