"""`detserve models list|pull`: what the model store holds, and fetching official checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("models", help="list the model store or pull official checkpoints")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    ls = sub.add_parser("list", help="models in the store")
    ls.add_argument("--store", type=Path, default=Path("models"))
    ls.add_argument("--available", action="store_true", help="also list what `models pull` can fetch")
    ls.set_defaults(func=_list)

    pull = sub.add_parser("pull", help="download an official MMDetection COCO checkpoint (RTMDet[-Ins], "
                                       "Faster/Mask R-CNN)")
    pull.add_argument("name", help="e.g. rtmdet-tiny-coco, rtmdet-ins-s-coco, mask-rcnn-r50-fpn-coco "
                                   "(the -coco suffix is optional)")
    pull.add_argument("--store", type=Path, default=Path("models"))
    pull.add_argument("--base-url", default=None,
                      help="mirror of the model's official folder (download.openmmlab.com/mmdetection/v3.0/rtmdet/ "
                           "for RTMDet, .../v2.0/ for Faster/Mask R-CNN)")
    pull.add_argument("--force", action="store_true", help="replace an existing model folder")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pull.set_defaults(func=_pull)


def store_rows(store: Path) -> list[dict]:
    from service.errors import ConfigError
    from service.settings import discover_models, load_model_config

    rows = []
    for name, folder in discover_models(store).items():
        try:
            cfg = load_model_config(folder)
        except ConfigError as exc:
            rows.append({"name": name, "arch": "?", "backend": "?", "input_size": "?", "weights": f"invalid: {exc}"})
            continue
        if cfg.weights is None:
            weights = "-"
        else:
            path = cfg.path(cfg.weights)
            weights = f"{path.name} ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else f"{cfg.weights} MISSING"
        rows.append({"name": cfg.name, "arch": cfg.arch, "backend": cfg.backend.value,
                     "input_size": str(cfg.input_size), "weights": weights})
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _list(args: argparse.Namespace) -> int:
    rows = store_rows(args.store)
    if rows:
        print(_table(rows, ["name", "arch", "backend", "input_size", "weights"]))
    else:
        print(f"no models in {args.store}")
    if args.available:
        from service.demo.zoo import ZOO

        print("\navailable with `detserve models pull NAME`:")
        print(_table([{"name": e.name, "arch": e.arch, "file": e.file_name} for e in ZOO.values()],
                     ["name", "arch", "file"]))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from service.demo.zoo import pull

    target = pull(args.name, args.store, base_url=args.base_url, force=args.force,
                  progress=not args.quiet)
    print(f"pulled {args.name} into {target}")
    return 0
