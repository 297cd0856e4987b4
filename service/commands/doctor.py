"""`detserve doctor [--model-store DIR]`: environment report; non-zero exit when a configured model cannot run."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check Python/torch/CUDA/cuDNN/ONNX Runtime/TensorRT and the configured models")
    p.add_argument("--model-store", help="also build every model of this store on its configured device")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..doctor import diagnose

    report = diagnose(Path(args.model_store) if args.model_store else None)
    if args.json:
        print(json.dumps({"facts": report.facts, "findings": [asdict(f) for f in report.findings],
                          "models": {k: asdict(v) for k, v in report.models.items()}}, indent=2))
    else:
        print(report.render())
    return 0 if report.models_ok else 1
