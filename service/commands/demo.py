"""`detserve demo ...`: the shapes dataset and the training of the bundled models."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="synthetic shapes dataset and bundled-model training")
    sub = parser.add_subparsers(dest="demo_command", required=True, metavar="ACTION")

    make = sub.add_parser("make-dataset", help="write a COCO-format shapes dataset")
    make.add_argument("out", type=Path, help="output folder (images/ and instances.json)")
    make.add_argument("--num", type=int, default=200)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--min-side", type=int, default=200)
    make.add_argument("--max-side", type=int, default=4000)
    make.add_argument("--small-shapes", type=int, default=None, metavar="N",
                      help="instead: 4000x3000 images with N non-overlapping 20-40 px shapes each (tiling, "
                           "docs/tiling.md); --min-side/--max-side are ignored")
    make.set_defaults(func=_make_dataset)

    train = sub.add_parser("train", help="train rtmdet-tiny / rtmdet-ins-tiny on shapes (CPU)")
    train.add_argument("--arch", required=True, choices=["rtmdet-tiny", "rtmdet-ins-tiny"])
    train.add_argument("--out", type=Path, required=True, help="model folder; weights.pth is written there")
    train.add_argument("--iters", type=int, default=1500)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--num-images", type=int, default=5000, help="rendered training images")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--init-from", type=Path, default=None, help="checkpoint to initialise from")
    train.add_argument("--cache", type=Path, default=None, help="reuse/write the rendered set (.npz)")
    train.set_defaults(func=_train)

    derive = sub.add_parser("derive-det", help="detection weights from a trained rtmdet-ins-tiny")
    derive.add_argument("--from", dest="source", type=Path, required=True, help="rtmdet-ins weights")
    derive.add_argument("--out", type=Path, required=True, help="model folder for the rtmdet-tiny weights")
    derive.set_defaults(func=_derive)


def _make_dataset(args: argparse.Namespace) -> int:
    from service.demo.dataset import make_dataset, make_small_shapes_dataset

    if args.small_shapes is not None:
        path = make_small_shapes_dataset(args.out, args.num, args.seed, num_shapes=args.small_shapes)
    else:
        path = make_dataset(args.out, args.num, args.seed, min_side=args.min_side, max_side=args.max_side)
    print(path)
    return 0


def _command_line() -> str:
    return "detserve " + shlex.join(sys.argv[1:])


def _train(args: argparse.Namespace) -> int:
    from service.demo.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch, out=args.out, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
        num_images=args.num_images, seed=args.seed, threads=args.threads, init_from=args.init_from,
        cache=args.cache, extra_meta={"command": _command_line()},
    )
    train(cfg, log=lambda msg: print(msg, flush=True))
    return 0


def _derive(args: argparse.Namespace) -> int:
    from service.demo.derive import derive_detection_weights

    path = derive_detection_weights(args.source, args.out, command=_command_line())
    print(path)
    return 0
