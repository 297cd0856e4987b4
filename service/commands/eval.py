"""`detserve eval`: COCO bbox (and segm) metrics of a model over an annotation file + images."""
from __future__ import annotations

import argparse
from pathlib import Path

from service.errors import ConfigError
from service.types import TILE_AUTO, TILE_OFF, DetectOptions, TileMerge


def _tile(value: str) -> int | str:
    if value in (TILE_AUTO, TILE_OFF):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a side in pixels, got {value!r}") from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return number


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="COCO metrics (pycocotools) of a model on a dataset")
    parser.add_argument("--model", required=True, help="model name (folder in --store) or a model folder")
    parser.add_argument("--ann", type=Path, required=True, help="COCO instances.json")
    parser.add_argument("--images", type=Path, default=None, help="image root (default: the json's folder)")
    parser.add_argument("--store", type=Path, default=Path("models"))
    parser.add_argument("--url", default=None, help="evaluate through a server, e.g. http://host:8080")
    parser.add_argument("--token", default=None, help="bearer token for --url")
    parser.add_argument("--batch-size", type=_positive, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--tile", type=_tile, default=None,
                        help="auto, off or a tile side in pixels (default: the model's [tiling] mode); docs/tiling.md")
    parser.add_argument("--tile-overlap", type=float, default=None, help="fraction of the side tiles share (0-0.5)")
    parser.add_argument("--tile-merge", choices=[m.value for m in TileMerge], default=None,
                        help="how overlapping tiles' detections merge (default: the model's)")
    parser.add_argument("--recall-score-thr", type=float, default=None,
                        help="score floor of the recall figure (default: the model's default_score_thr)")
    parser.set_defaults(func=run)


def resolve_model_dir(model: str, store: Path) -> Path:
    candidate = Path(model)
    if (candidate / "model.toml").is_file():
        return candidate
    if (store / model / "model.toml").is_file():
        return store / model
    raise ConfigError(f"no model {model!r}: neither a folder with model.toml nor {store / model}")


def run(args: argparse.Namespace) -> int:
    from service.demo.evaluate import dump_json, evaluate_in_process, evaluate_over_http, format_report

    if not args.ann.is_file():
        raise ConfigError(f"annotation file {args.ann} does not exist")
    images = args.images or args.ann.parent
    tiling = DetectOptions(tile=args.tile, tile_overlap=args.tile_overlap,
                           tile_merge=TileMerge(args.tile_merge) if args.tile_merge else None)
    if args.url:
        name = Path(args.model).name if (Path(args.model) / "model.toml").is_file() else args.model
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
        report = evaluate_over_http(args.url, name, args.ann, images, progress=not args.quiet, headers=headers,
                                    tiling=tiling, recall_score_thr=0.3 if args.recall_score_thr is None
                                    else args.recall_score_thr)
    else:
        model_dir = resolve_model_dir(args.model, args.store)
        report = evaluate_in_process(model_dir, args.ann, images, batch_size=args.batch_size,
                                     progress=not args.quiet, tiling=tiling, recall_score_thr=args.recall_score_thr)
    print(format_report(report))
    if args.json:
        dump_json(report, args.json)
    return 0
