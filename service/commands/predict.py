"""`detserve predict IMAGE... [--model NAME_OR_DIR]`: one TorchServe-style JSON list per image on stdout.

Runs the model in this process; without --model, the default model (settings.default_model_name, the
rule the server uses too). Remote modes (a running server over REST or gRPC) plug in as another
`Detector` factory in `_detector_for`; parsing, output and --draw stay the same. The request knobs
are the server's (docs/api.md); the output's boxes are written by protocols/render.py, as the doors do.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..client.cli import add_remote_arguments, remote_detector, wants_remote
from ..engine.dataplane import knob_options
from ..errors import DetserveError, InvalidRequest, ModelNotFound
from ..settings import MODEL_CONFIG_FILE
from ..types import DetectOptions, DetectResult, EncodedImage, RenderFormat

# images + one options value for all -> one result or typed error per image
Detector = Callable[[Sequence[EncodedImage], DetectOptions], list[DetectResult | DetserveError]]


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="detect objects in image files and print JSON")
    p.add_argument("images", nargs="+", type=Path, help="JPEG, PNG, WebP or BMP files")
    p.add_argument("--model", help="model name in the store, or a model folder (default: the default model: "
                   "DETSERVE_DEFAULT_MODEL, else the store's only model, else rtmdet)")
    p.add_argument("--model-store", type=Path, default=Path("models"), help="folder of model folders (default: models)")
    p.add_argument("--score-thr", type=float, help="keep detections scoring at least this (default: the model's)")
    p.add_argument("--max-dets", type=int, help="at most this many detections per image")
    p.add_argument("--classes", help="comma-separated class names to keep")
    p.add_argument("--iou-thr", help="final NMS IoU threshold in (0, 1] (default: the model's test_cfg)")
    p.add_argument("--class-agnostic", nargs="?", const="true", metavar="BOOL",
                   help="one NMS over all classes (true/false; the flag alone means true)")
    p.add_argument("--box-format", help="bbox as xyxy (default), xywh or cxcywh")
    p.add_argument("--normalized", nargs="?", const="true", metavar="BOOL",
                   help="bbox divided by the image width/height (true/false; the flag alone means true)")
    p.add_argument("--mask-format", help="rle (default), polygon or none")
    p.add_argument("--tile", help="sliced inference: auto, off or a tile side in pixels (default: the model's)")
    p.add_argument("--tile-overlap", help="fraction of a tile shared with the next, [0, 0.5]")
    p.add_argument("--tile-merge", help="how tiles' detections merge: nms or nmm")
    p.add_argument("--draw", type=Path, help="write the annotated image (.png or .jpg); with several images "
                   "each gets NAME-<image stem>.EXT")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the model's setting)")
    add_remote_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import orjson

    from ..protocols.render import torchserve_result

    try:
        options = options_from_args(args)
    except InvalidRequest as err:
        print(f"detserve: {err.message}", file=sys.stderr)
        return 2
    if args.draw is not None and (problem := draw_target_problem(args.draw)) is not None:
        print(f"detserve: --draw {args.draw}: {problem}", file=sys.stderr)  # before any model load or output
        return 2
    detect = _detector_for(args)
    failed = False
    for path in args.images:
        try:
            image = EncodedImage(path.read_bytes())
        except OSError as exc:
            print(f"detserve: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            failed = True
            continue
        (result,) = detect([image], options)
        if isinstance(result, DetserveError):
            print(f"detserve: {path}: {result.code}: {result.message}", file=sys.stderr)
            failed = True
            continue
        sys.stdout.buffer.write(orjson.dumps(torchserve_result(result, options)) + b"\n")
        sys.stdout.flush()
        if args.draw is not None and result.rendered is not None:
            target = draw_path(args.draw, path, several=len(args.images) > 1)
            target.write_bytes(result.rendered)
    return 1 if failed else 0


def options_from_args(args: argparse.Namespace) -> DetectOptions:
    classes = None
    if args.classes:
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    render = None
    if args.draw is not None:
        render = RenderFormat.JPEG if args.draw.suffix.lower() in (".jpg", ".jpeg") else RenderFormat.PNG
    # Checked by the server's own rules (engine/dataplane.py), so a bad flag reads like a bad parameter.
    knobs = knob_options(
        iou_thr=args.iou_thr, class_agnostic=args.class_agnostic, box_format=args.box_format,
        normalized=args.normalized, mask_format=args.mask_format, tile=args.tile, tile_overlap=args.tile_overlap,
        tile_merge=args.tile_merge)
    return dataclasses.replace(knobs, score_thr=args.score_thr, max_dets=args.max_dets, classes=classes, render=render)


def draw_target_problem(draw: Path) -> str | None:
    """Why pictures cannot be written at `draw` (a file name, or the stem of one per image), else None."""
    if draw.is_dir():
        return "is a folder; give a file name ending in .png or .jpg"
    folder = draw.parent
    if not folder.is_dir():
        return f"folder {str(folder)!r} does not exist"
    if not os.access(folder, os.W_OK):
        return f"folder {str(folder)!r} is not writable"
    return None


def draw_path(draw: Path, image: Path, *, several: bool) -> Path:
    if not several:
        return draw
    return draw.with_name(f"{draw.stem}-{image.stem}{draw.suffix or '.png'}")


def resolve_model_folder(name_or_dir: str, store: Path) -> Path:
    """A folder holding model.toml, else `<store>/<name>`."""
    direct = Path(name_or_dir)
    if (direct / MODEL_CONFIG_FILE).is_file():
        return direct
    in_store = store / name_or_dir
    if (in_store / MODEL_CONFIG_FILE).is_file():
        return in_store
    raise ModelNotFound(f"model {name_or_dir!r} not found: no {MODEL_CONFIG_FILE} in {direct} or {in_store}")


def default_model(store: Path) -> str:
    """The model `detserve predict` runs without --model: the server's rule over the store's folders."""
    from ..settings import default_model_name, discover_models, load_server_settings

    return default_model_name(load_server_settings().default_model, list(discover_models(store)))


def _detector_for(args: argparse.Namespace) -> Detector:
    if wants_remote(args):  # --url / --grpc: a running server does the work (service.client)
        return remote_detector(args)
    return _local_detector(args)


def _local_detector(args: argparse.Namespace) -> Detector:
    from ..pipeline.predictor import Predictor
    from ..pipeline.tiling import predict_tiled
    from ..settings import load_model_config

    cfg = load_model_config(resolve_model_folder(args.model or default_model(args.model_store), args.model_store))
    predictor = Predictor.from_config(cfg, device=args.device)

    def detect(images: Sequence[EncodedImage], options: DetectOptions) -> list[DetectResult | DetserveError]:
        # The engine's tiling in-process: same plan, tiles and merge; untiled images go as one batch.
        return predict_tiled(predictor, images, options)

    return detect
