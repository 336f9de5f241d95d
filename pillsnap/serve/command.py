"""The API process: `pillsnap serve` and the stage's API check (`python -m pillsnap.serve`) both run this.

    python -m pillsnap.serve [--config F] [--profile P] [--stage N] [--engine torch|onnx] [--host H] [--port P]
                             [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, help="stage whose models to serve (default: the highest trained)")
    p.add_argument("--engine", choices=["torch", "onnx"], help="default: inference.engine")
    p.add_argument("--host", help="default: serve.host (127.0.0.1)")
    p.add_argument("--port", type=int, help="default: serve.port (8000)")


def serve_command(args: argparse.Namespace, cfg) -> int:
    """Serve the stage's models until interrupted; 2 with the reason when they cannot be served."""
    from pillsnap.environment import api_keys_from_environment
    from pillsnap.serve.server import read_api_keys, serve_stage

    keys = read_api_keys(cfg, api_keys_from_environment())
    try:
        serve_stage(cfg, args.stage, args.engine, args.host or cfg.serve.host, args.port or cfg.serve.port, keys)
    except (ValueError, FileNotFoundError) as e:
        print(f"pillsnap serve: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from pillsnap.config import ConfigError, load_config
    from pillsnap.environment import overrides_from_environment, prepare_process
    from pillsnap.logs import setup_console

    p = argparse.ArgumentParser(prog="python -m pillsnap.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="base config YAML (default: configs/pillsnap.yaml)")
    p.add_argument("--profile", help="profile overlay: a name in configs/profiles/ or a YAML path")
    add_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup_console()
    try:
        cfg = load_config(args.config, args.profile, [*args.overrides, *overrides_from_environment()])
    except ConfigError as e:
        print(f"pillsnap serve: configuration error: {e}", file=sys.stderr)
        return 2
    prepare_process(cfg.exp_dir)
    return serve_command(args, cfg)
