"""`detserve` command line: argv -> settings -> the command. Nothing heavy happens at import.

Each sub-command lives in `service/commands/<name>.py` and exposes `register(subparsers)`, which
adds its parser and sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("serve", "predict", "annotate", "models", "demo", "eval", "export", "doctor", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detserve", description="Object-detection model serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"service.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"service.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DetserveError

    try:
        return int(args.func(args) or 0)
    except DetserveError as exc:
        print(f"detserve: error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out / --draw / --json, a missing folder: say which, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"detserve: error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
