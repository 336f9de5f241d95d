"""`pillsnap predict` and `pillsnap export`: argument set-up and the commands (registered in flows/cli.py).

    pillsnap predict [--mode single|combo|auto] [--engine torch|onnx] [--stage N] [--hard-cases F.jsonl]
                     [--profile P] IMAGE... [key=value ...]
    pillsnap export --stage N [--no-slim] [--profile P] [key=value ...]

Options come before the images (argparse reads the positional words in one go, as for every pillsnap command).

predict prints one JSON object per image in a list: {image, mode_requested, mode_used, fallback_reason,
gating_score, single_confidence, pills: [{k_code, drug_name, confidence, top5, box, identifiers}]}. An unreadable
photo gets {image, error} in its place, the others are still answered, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Tuple


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "predict":
        p.add_argument("images", nargs="+", metavar="IMAGE", help="photo(s) to recognise")
        p.add_argument("--mode", choices=["single", "combo", "auto"], help="default: inference.mode")
        p.add_argument("--engine", choices=["torch", "onnx"], help="default: inference.engine")
        p.add_argument("--stage", type=int, help="stage whose models to use (default: the highest trained stage)")
        p.add_argument("--hard-cases", help="append D-3 hard cases to this JSONL file")
    if name == "export":
        p.add_argument("--stage", type=int, default=1, help="stage number 1-4 (default 1)")
        p.add_argument("--no-slim", action="store_true", help="skip the onnxslim pass")


def split_images_and_overrides(tokens: List[str]) -> Tuple[List[str], List[str]]:
    """argparse cannot tell two variable-length positionals apart: key=value tokens that are not files are
    config overrides, everything else is an image."""
    images, overrides = [], []
    for token in tokens:
        (overrides if "=" in token and not Path(token).exists() else images).append(token)
    return images, overrides


def predict_command(args: argparse.Namespace, load: Callable) -> int:
    from pillsnap.infer.engines import InferenceSetupError
    from pillsnap.infer.predict import load_predictor

    args.images, args.overrides = split_images_and_overrides(list(args.overrides) + list(args.images))
    if not args.images:
        print("pillsnap predict: no image given", file=sys.stderr)
        return 2
    cfg = load(args)
    try:
        predictor = load_predictor(cfg, args.stage, args.engine, Path(args.hard_cases) if args.hard_cases else None)
    except (InferenceSetupError, FileNotFoundError) as e:
        print(f"pillsnap predict: {e}", file=sys.stderr)
        return 2
    results, failed = [], 0
    for image in args.images:
        try:
            results.append(predictor.predict(image, args.mode))
        except FileNotFoundError as e:  # unreadable or missing: reported, and the next photo is answered
            failed += 1
            results.append({"image": image, "error": str(e)})
            print(f"pillsnap predict: {e}", file=sys.stderr)
    print(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    return 1 if failed else 0


def export_command(args: argparse.Namespace, load: Callable) -> int:
    from pillsnap.infer.engines import InferenceSetupError
    from pillsnap.infer.export import ExportParityError, export_stage

    cfg = load(args)
    try:
        report = export_stage(cfg, args.stage, slim=not args.no_slim)
    except ExportParityError as e:
        print(f"pillsnap export: {e}", file=sys.stderr)
        return 1
    except (InferenceSetupError, FileNotFoundError) as e:
        print(f"pillsnap export: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    return 0
