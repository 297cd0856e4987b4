"""`detserve serve`: start the inference, management, metrics (and gRPC) servers.

Precedence: defaults < --config TOML < DETSERVE_* environment < the flags given here.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the models of a model store over REST, gRPC and metrics")
    p.add_argument("--config", help="server settings TOML file (keys of ServerSettings)")
    p.add_argument("--model-store", help="folder holding <model>/model.toml (default: models)")
    p.add_argument("--models", help="comma-separated model names to load at start-up (default: all in the store)")
    p.add_argument("--host", help="address for the inference, metrics and gRPC APIs (management stays on its own address)")
    p.add_argument("--management-host", help="address for the management API (default 127.0.0.1)")
    p.add_argument("--inference-port", type=int)
    p.add_argument("--management-port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--no-grpc", action="store_true", help="do not start the gRPC server")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    if args.model_store is not None:
        out["model_store"] = args.model_store
    if args.models is not None:
        out["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.host is not None:
        out.update(inference_address=args.host, metrics_address=args.host, grpc_address=args.host)
    if args.management_host is not None:
        out["management_address"] = args.management_host
    for flag in ("inference_port", "management_port", "metrics_port", "grpc_port", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            out[flag] = value
    if args.no_grpc:
        out["enable_grpc"] = False
    return out


def run(args: argparse.Namespace) -> int:
    from ..server import run_server
    from ..settings import load_server_settings

    settings = load_server_settings(args.config, **overrides_from_args(args))
    return run_server(settings)
