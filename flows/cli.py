"""`pillsnap …`: the command line for everything a user does. Thin: it calls the library or starts the flows,
which is why it lives with the orchestration, outside the library.

Every command takes --config (base YAML), --profile (an overlay in configs/profiles/) and key=value overrides
(CLI > profile > base), e.g. `pillsnap stage --stage 1 --profile cpu-demo train.classification.epochs=3`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

DEMO_MIN_RECALL, DEMO_MIN_PER_PILL = 0.9, 0.7  # the detector's half, on the combination validation photos
EXIT_GATE_STOPPED = 3  # `progress`: a gate or a decision stopped the progression (the last line says why)
EXIT_REFUSED = 4  # a stage or the final test may not run now (the message says why and what to do)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="base config YAML (default: configs/pillsnap.yaml)")
    p.add_argument("--profile", help="profile overlay: a name in configs/profiles/ or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=128")


def _load(args):
    """The typed config, with the environment's settings read here, at the boundary (pillsnap.environment)."""
    from pillsnap.config import load_config
    from pillsnap.environment import overrides_from_environment, prepare_process
    from pillsnap.evaluate.criteria import validate_evaluation_config

    cfg = load_config(args.config, args.profile, [*args.overrides, *overrides_from_environment()])
    validate_evaluation_config(cfg.evaluation)  # stage tables and check names, before any work
    prepare_process(cfg.exp_dir)
    return cfg


def _print(obj: Dict) -> None:
    print(json.dumps(obj, indent=1, ensure_ascii=False, default=str))


def cmd_synth(args) -> int:
    from pillsnap.data.prepare import source_root
    from pillsnap.data.synth import synthesize
    cfg = _load(args)
    out = args.out or str(source_root(cfg) if cfg.data.source == "synthetic" else cfg.synth.out_dir)
    _print({"out_dir": out, **synthesize(cfg.synth, out, show_progress=cfg.logging.progress_bar)})
    return 0


def cmd_import(args) -> int:
    from pillsnap.config import save_resolved
    from tasks.common import run_name
    from pillsnap.data.prepare import run_import
    cfg = _load(args)
    save_resolved(cfg, f"import-{run_name()}")
    _print(run_import(cfg, show_progress=cfg.logging.progress_bar))
    return 0


def cmd_validate(args) -> int:
    from pillsnap.data.prepare import run_validation
    from pillsnap.data.validate import DataValidationError
    cfg = _load(args)
    try:
        result = run_validation(cfg, show_progress=cfg.logging.progress_bar)
    except DataValidationError as e:
        print(e, file=sys.stderr)
        return 2
    print(open(result["summary"]).read())
    return 0


def cmd_subset(args) -> int:
    from pillsnap.data.prepare import run_subset
    _print(run_subset(_load(args), args.stage))
    return 0


def _flow_env() -> None:
    """No telemetry from the embedded Prefect server. Nothing here forces offline mode: pretrained weights are
    downloaded when the config asks for them and the network allows (the Makefile's demo and tests run offline)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def cmd_data(args) -> int:
    _flow_env()
    from flows.data import data_flow
    _print(data_flow(profile=args.profile, overrides=args.overrides, config_path=args.config))
    return 0


def cmd_progress(args) -> int:
    _flow_env()
    from flows.progressive import progressive_flow
    result = progressive_flow(start_stage=args.start, end_stage=args.end, mode=args.mode, profile=args.profile,
                              overrides=args.overrides, config_path=args.config)
    _print(result)
    print(result["outcome"]["sentence"])
    return EXIT_GATE_STOPPED if result["outcome"]["gate_stopped"] else 0


def cmd_attest(args) -> int:
    """A named person confirms an attested check ahead of a stage's decision (recorded in ledger.json)."""
    from pillsnap.ledger import Ledger
    cfg = _load(args)
    if args.check not in cfg.evaluation.checks.attested:
        print(f"pillsnap attest: --check {args.check!r} is not an attested check (evaluation.checks.attested: "
              f"{list(cfg.evaluation.checks.attested)})", file=sys.stderr)
        return 2
    try:
        _print(Ledger.of(cfg.exp_dir).attest(args.stage, args.check, args.reviewer, args.note or ""))
    except ValueError as e:
        print(f"pillsnap attest: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_reopen(args) -> int:
    """A named person reopens Stage 4 for training after a final test (recorded in ledger.json)."""
    from pillsnap.ledger import Ledger
    cfg = _load(args)
    try:
        _print(Ledger.of(cfg.exp_dir).reopen(args.stage, args.reviewer, args.reason))
    except ValueError as e:
        print(f"pillsnap reopen: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_final_test(args) -> int:
    if args.force and not ((args.reviewer or "").strip() and (args.reason or "").strip()):
        print("pillsnap final-test: --force needs --reviewer NAME and --reason TEXT (every evaluation of the sealed "
              "split is counted and named)", file=sys.stderr)
        return 2
    _flow_env()
    from flows.final_test import final_test_flow
    forced = (args.reviewer, args.reason) if args.force else ("", "")
    _print(final_test_flow(profile=args.profile, overrides=args.overrides, config_path=args.config,
                           forced_by=forced[0], force_reason=forced[1]))
    return 0


def cmd_checks(args) -> int:
    """Every stage check: its definition, whether a person attests it, the stages that make it mandatory."""
    from pillsnap.evaluate.checks.registry import DEFINITIONS

    cfg = _load(args)
    for name, definition in DEFINITIONS.items():
        stages = [str(n) for n, c in sorted(cfg.evaluation.stages.items()) if name in c.mandatory_checks]
        kind = "attested by a named person" if name in cfg.evaluation.checks.attested else "measured"
        print(f"{name} ({kind}; mandatory at stage {', '.join(stages) or 'none'})\n    {definition}")
    return 0


def cmd_predict(args) -> int:
    from flows.cli_infer import predict_command
    return predict_command(args, _load)


def cmd_export(args) -> int:
    from flows.cli_infer import export_command
    return export_command(args, _load)


def cmd_serve(args) -> int:
    from pillsnap.serve.command import serve_command

    return serve_command(args, _load(args))


def cmd_stage(args) -> int:
    _flow_env()
    from flows.stage import stage_flow
    _print(stage_flow(stage=args.stage, profile=args.profile, overrides=args.overrides, config_path=args.config,
                      without_approved_predecessor=args.without_approved_predecessor or ""))
    return 0


def cmd_train_node(args) -> int:
    """Node k of a multi-node training: the library joins node 0's attempts; nothing here touches Prefect."""
    from pillsnap.train.distributed.node import NoAttempt, join_stage_training
    try:
        return join_stage_training(_load(args), args.stage, args.follow, args.wait_s)
    except NoAttempt as e:
        print(f"pillsnap train-node: {e}", file=sys.stderr)
        return 1


def cmd_demo(args) -> int:
    """Synthesize → import → validate → Stage 1 on the CPU, with Prefect's embedded server."""
    _flow_env()
    cfg = _load(args)  # fail fast on a bad key before starting Prefect
    from flows.demo import demo_flow
    started = time.time()
    print(f"PillSnap demo: synthetic data -> {cfg.synth.out_dir}, experiment -> {cfg.paths.exp_dir}", flush=True)
    result = demo_flow(profile=args.profile, overrides=args.overrides, config_path=args.config)["stage"]
    minutes = (time.time() - started) / 60
    verdicts = demo_verdicts(cfg, result)
    print("\n" + "=" * 72)
    print(f"Stage 1 validation accuracy: {result['accuracy']:.4f} (macro-F1 {result['macro_f1']:.4f}, "
          f"top-5 {result['top5']:.4f}, n={result['n_val']}); gate {cfg.stage(1).min_accuracy}")
    print(f"Go/No-Go: {result['go_no_go']} {result['reasons']}; advisor: {result['recommendation']}; "
          f"choice: {result['choice']} ({result['chosen_by']})")
    for line, ok in verdicts:
        print(f"  [{'ok' if ok else 'FAILED'}] {line}")
    loose = result.get("gates_loosened") or []
    if loose:  # the profile's sizes scale gates down: on the record, and named here
        print("Gates looser than the shipped configs/pillsnap.yaml (in the ledger): "
              + "; ".join(f"{d['key']} {d['shipped']} -> {d['applied']}" for d in loose))
    print(f"Stage report: {result['report']}")
    print(f"Experiment dir (checkpoints, TensorBoard, ledger): {result['exp_dir']}")
    print("Artifacts: stage-1-report, stage-1-checks, stage-1-targets, stage-1-training-progress "
          "(see the Prefect UI: make server)")
    print(f"Total time: {minutes:.1f} min")
    return 0 if all(ok for _, ok in verdicts) else 1


def demo_verdicts(cfg, result: Dict) -> List[tuple[str, bool]]:
    """What the demo must show: GO, every mandatory check measured and passed, and the detector finding pills."""
    checks = result.get("checks") or {}
    mandatory = {n: checks.get(n, "not_measured") for n in cfg.evaluation.stages[1].mandatory_checks}
    combo = (result.get("detection") or {}).get("combination") or {}
    recall, per_pill = combo.get("detection_recall"), combo.get("per_pill_accuracy")
    shown = lambda v: "not measured" if v is None else f"{v:.3f}"  # noqa: E731
    return [
        (f"Go/No-Go is {result['go_no_go']}", result["go_no_go"] == "GO"),
        (f"mandatory checks: {mandatory}", all(s == "pass" for s in mandatory.values())),
        (f"combination photos: detection recall {shown(recall)} (>= {DEMO_MIN_RECALL})",
         recall is not None and recall >= DEMO_MIN_RECALL),
        (f"combination photos: per-pill accuracy {shown(per_pill)} (>= {DEMO_MIN_PER_PILL})",
         per_pill is not None and per_pill >= DEMO_MIN_PER_PILL),
    ]


COMMANDS: Dict[str, tuple[Callable, str]] = {
    "synth": (cmd_synth, "write synthetic pill photos in the AIHub layout"),
    "import": (cmd_import, "import the AIHub layout or a manifest CSV into manifest.csv + class_map.json"),
    "validate": (cmd_validate, "validate the imported data; write the report and quarantine list"),
    "subset": (cmd_subset, "build a stage subset (nested classes, stratified train/val)"),
    "data": (cmd_data, "run the data-preparation flow (synthesize / import / validate)"),
    "stage": (cmd_stage, "run one stage flow (train, evaluate, Go/No-Go, advisor, report)"),
    "progress": (cmd_progress, "progressive flow: advance one stage by the ledger, or run stages in order"),
    "final-test": (cmd_final_test, "the final test on the sealed test split (after Stages 1-4 approved in order)"),
    "attest": (cmd_attest, "confirm an attested check as a named person, ahead of a stage's decision"),
    "checks": (cmd_checks, "list every stage check: definition, attested or measured, the stages that require it"),
    "reopen": (cmd_reopen, "reopen Stage 4 for training after a final test (a named person, with a reason)"),
    "predict": (cmd_predict, "recognise pills in photos: single | combo | auto, torch or ONNX engine"),
    "export": (cmd_export, "export a stage's classifier (and detector) to ONNX with a torch parity check"),
    "serve": (cmd_serve, "serve a trained stage over HTTP (FastAPI on uvicorn): health, ready, predict, metrics"),
    "demo": (cmd_demo, "the Stage 1 demo: synthetic data, Prefect's embedded server, CPU"),
    "train-node": (cmd_train_node, "on a node other than node 0: join the stage's training started by node 0's "
                                   "stage run (no flow, no lock; exits with the training group)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pillsnap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _config_args(p)
        if name == "synth":
            p.add_argument("--out", help="output folder (default: synth.out_dir)")
        if name == "train-node":
            p.add_argument("--follow", action="store_true",
                           help="after a training group ends, wait for the next attempt (a retry, or this stage "
                                "again) instead of exiting")
            p.add_argument("--wait-s", type=float, help="give up when no attempt starts within this many seconds")
        if name in ("subset", "stage", "attest", "train-node"):
            p.add_argument("--stage", type=int, default=1, help="stage number 1-4 (default 1)")
        if name == "stage":
            p.add_argument("--without-approved-predecessor", metavar="'NAME: REASON'",
                           help="run although the previous stage is not approved (recorded; the regression "
                                "guard is skipped on the record)")
        if name == "attest":
            p.add_argument("--check", required=True, help="an attested check (evaluation.checks.attested)")
            p.add_argument("--reviewer", required=True, help="your name: an attestation needs a person")
            p.add_argument("--note", help="what you checked")
        if name == "reopen":
            p.add_argument("--stage", type=int, default=4, help="the sealed stage (4)")
            p.add_argument("--reviewer", required=True, help="your name")
            p.add_argument("--reason", required=True, help="why Stage 4 trains again after a final test")
        if name == "progress":
            p.add_argument("--mode", choices=["advance", "run"], default="advance",
                           help="advance: one step decided by ledger.json (for schedules); run: stages in order")
            p.add_argument("--start", type=int, default=1)
            p.add_argument("--end", type=int, default=4)
        if name == "final-test":
            p.add_argument("--force", action="store_true",
                           help="evaluate again although the final test already ran on this Stage 4 (needs --reviewer "
                                "and --reason; counted)")
            p.add_argument("--reviewer", help="with --force: your name")
            p.add_argument("--reason", help="with --force: why the sealed split is evaluated again")
        if name in ("predict", "export"):
            from flows.cli_infer import add_arguments
            add_arguments(name, p)
        if name == "serve":
            from pillsnap.serve.command import add_arguments as serve_arguments
            serve_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from pillsnap.config import ConfigError
    from pillsnap.logs import setup_console
    args = build_parser().parse_args(argv)
    setup_console()
    if args.command == "demo" and not args.profile:
        args.profile = "cpu-demo"
    from pillsnap.evaluate.final_test import FinalTestRefused
    from pillsnap.ledger import StageRefused
    try:
        return COMMANDS[args.command][0](args)
    except ConfigError as e:
        print(f"pillsnap: configuration error: {e}", file=sys.stderr)
        return 2
    except (StageRefused, FinalTestRefused) as e:
        print(f"pillsnap {args.command}: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
