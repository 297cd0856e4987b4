"""`detserve export MODEL --format onnx [--end2end]`: write the ONNX graph next to model.toml and check parity."""
from __future__ import annotations

import argparse
import re
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX (network-only or end2end) and check parity")
    p.add_argument("model", help="model name in the model store, or a model folder")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--end2end", action="store_true",
                   help="put decode + NMS (+ masks) in the graph: outputs dets/labels[/masks] like MMDeploy's end2end.onnx")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--model-store", default="models", help="folder holding <model>/model.toml (default: models)")
    p.add_argument("--out", help="output file (default: <model folder>/model.onnx or end2end.onnx)")
    p.add_argument("--parity-images", type=int, default=8, help="generated images for the parity check (0: skip)")
    p.add_argument("--set-default", action="store_true",
                   help="also switch model.toml to backend = \"onnxruntime\" with this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    from ..detectors.base import get_detector
    from ..errors import ConfigError
    from ..export.onnx_export import export_onnx
    from ..export.parity import run_parity
    from ..settings import load_model_config

    folder = Path(args.model)
    if not (folder / "model.toml").is_file():
        folder = Path(args.model_store) / args.model
    if not (folder / "model.toml").is_file():
        raise ConfigError(f"no model {args.model!r}: neither {args.model}/model.toml nor {folder}/model.toml exists")
    cfg = load_model_config(folder)
    result = export_onnx(cfg, end2end=args.end2end, opset=args.opset, out=Path(args.out) if args.out else None)
    layout = "end2end (decode + NMS in the graph)" if result.end2end else "network-only (shared postprocessing)"
    shape = get_detector(cfg.arch).input_description(cfg)
    extra = [p.name for p in result.extra_files]
    print(f"wrote {result.path} ({layout}; opset {result.opset}, {result.exporter} exporter, dynamic batch, "
          f"{shape}; outputs {', '.join(result.output_names)})" + (f"; with {', '.join(extra)} next to it" if extra else ""))

    status = 0
    if args.parity_images > 0:
        from ..export.parity import shape_images

        report = run_parity(cfg, result.path, end2end=result.end2end, images=shape_images(args.parity_images))
        print(report.summary())
        for line in report.unmatched[:10]:
            print(f"  unmatched eager detection: {line}")
        status = 0 if report.ok() else 1

    print(auto_summary(cfg, None if args.parity_images <= 0 else status == 0))

    model_field = _relative_to(result.path, cfg.root)
    if args.set_default:
        # The ONNX worker never opens the PyTorch checkpoint, so its class names must be in model.toml.
        classes = None if (cfg.classes or cfg.classes_file) else list(result.classes)
        set_onnx_default(folder / "model.toml", model_field, result.end2end, classes)
        load_model_config(folder)  # validate what we wrote
        print(f"{folder / 'model.toml'}: backend = \"onnxruntime\" with [onnxruntime] model = \"{model_field}\"")
    else:
        hint = ('to serve it, set in model.toml:\n  backend = "onnxruntime"\n'
                f'  [onnxruntime]\n  model = "{model_field}"\n  end2end = {str(result.end2end).lower()}\n')
        if not (cfg.classes or cfg.classes_file):
            hint += f"and, above [onnxruntime], the checkpoint's class names:\n  classes = {list(result.classes)}\n"
        print(hint + "(or rerun with --set-default)")
    return status


def auto_summary(cfg, cpu_parity_passed: bool | None) -> str:
    """What backend = "auto" picks for this model: from auto's cache when decided, else from this export's parity."""
    from ..backends.auto import describe_plan
    from ..pipeline.predictor import resolve_device

    device = resolve_device(cfg.device)
    plan = describe_plan(cfg, device)
    if plan.startswith("not decided yet") and not device.startswith("cuda") and cpu_parity_passed is not None:
        verdict = "onnxruntime cpu (this graph passed parity)" if cpu_parity_passed else "eager (this graph failed parity)"
        plan = f"{verdict}; its own export and check run on the first load ({plan})"
    return f'backend = "auto" on {device}: {plan.removeprefix("auto: ")}'


def _relative_to(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def set_onnx_default(toml_path: Path, model_file: str, end2end: bool, classes: list[str] | None = None) -> None:
    """Rewrite model.toml: top-level backend = "onnxruntime" and a fresh [onnxruntime] table.

    Keeps every other line; only the top-level `backend` key and the old [onnxruntime] table
    (whose other keys, such as providers, are carried over) are replaced.
    """
    import tomllib

    text = toml_path.read_text()
    old = tomllib.loads(text).get("onnxruntime", {})
    lines = text.splitlines()
    out: list[str] = []
    section: str | None = None
    for line in lines:
        header = re.match(r"^\s*\[([^\]]+)\]\s*$", line)
        if header:
            section = header.group(1).strip()
        if section == "onnxruntime":
            continue
        if section is None and re.match(r"^\s*backend\s*=", line):
            continue
        out.append(line)
    first_table = next((i for i, line in enumerate(out) if re.match(r"^\s*\[", line)), len(out))
    out.insert(first_table, 'backend = "onnxruntime"')
    if classes:
        out.insert(first_table, f"classes = {_toml_value(classes)}")
    table = {**old, "model": model_file, "end2end": end2end}
    out += ["", "[onnxruntime]"] + [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    toml_path.write_text("\n".join(out).rstrip("\n") + "\n")


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of strings are valid TOML as JSON
