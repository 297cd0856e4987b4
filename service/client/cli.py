"""`detserve predict --url http://host:8080 IMAGE...` / `--grpc host:7070`: predict through a
running server with the Python client instead of loading the model locally.

`service/commands/predict.py` calls `add_remote_arguments(parser)` when building its parser and
hands over to `run_remote(args)` when `args.url` or `args.grpc` is set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from .client import DetserveClient


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("remote server (instead of running the model here)")
    endpoint = group.add_mutually_exclusive_group()
    endpoint.add_argument("--url", help="a detserve inference API, e.g. http://localhost:8080")
    endpoint.add_argument("--grpc", metavar="HOST:PORT", help="a detserve gRPC API, e.g. localhost:7070")
    group.add_argument("--token", help="bearer token for a server with token auth")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")


def wants_remote(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "url", None) or getattr(args, "grpc", None))


def _classes(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    return [c.strip() for c in value if c.strip()] or None


def _images(args: argparse.Namespace) -> list[Path]:
    for name in ("images", "image", "inputs", "paths"):
        value = getattr(args, name, None)
        if value:
            return [Path(v) for v in (value if isinstance(value, list) else [value])]
    return []


def run_remote(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """One JSON line per image: {"image", "model", "width", "height", "detections"} (TorchServe shape)."""
    paths = _images(args)
    if not paths:
        print("detserve predict: give one or more image files", file=sys.stderr)
        return 2
    with DetserveClient(getattr(args, "url", None), grpc=getattr(args, "grpc", None), model=getattr(args, "model", None),
                        timeout_s=getattr(args, "timeout", 30.0), token=getattr(args, "token", None)) as client:
        results = client.detect_batch(
            [p.read_bytes() for p in paths], score_thr=getattr(args, "score_thr", None),
            max_dets=getattr(args, "max_dets", None), classes=_classes(getattr(args, "classes", None)),
        )
    for path, result in zip(paths, results):
        line = {"image": str(path), "model": result.model_name, "width": result.image_width,
                "height": result.image_height, "detections": result.to_torchserve()}
        print(json.dumps(line), file=out)
    return 0
