"""Evaluation and decision tasks: evaluate on the stage's val split, combination accuracy, the stage checks,
Go/No-Go and the advisor (each decision also written to stage_<n>/reports/)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from pillsnap.core import layout
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.evaluate.advisor import OptimizationAdvisor
from pillsnap.evaluate.go_no_go import evaluate_go_no_go
from pillsnap.evaluate.stage_eval import evaluate_classifier
from tasks.common import cfg_of, library_logs_in_run


def _reports(config: Dict, stage: int) -> Path:
    return layout.reports_dir(cfg_of(config).exp_dir, stage)


@task(name="evaluate-stage")
def evaluate_task(config: Dict, stage: int, checkpoint: str, batch_size: Optional[int] = None,
                  with_previous_stage: bool = False) -> Dict:
    """`with_previous_stage`: also on the previous stage's val photos (the regression guard's like-for-like)."""
    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        previous = None
        if with_previous_stage:
            try:
                previous = read_subset(cfg.exp_dir, stage - 1)[0]
            except FileNotFoundError as e:  # the regression guard then says "not evaluated on its photos"
                get_run_logger().warning("regression guard: Stage %d's subset is gone (%s)", stage - 1, e)
        return evaluate_classifier(cfg, Path(checkpoint), subset, ClassMap.load(class_map_path(cfg)),
                                   _reports(config, stage), batch_size, previous)


@task(name="combination-accuracy")
def combination_task(config: Dict, stage: int) -> Dict:
    from pillsnap.evaluate.stage_detection import combination_accuracy
    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        return combination_accuracy(cfg, stage, subset, ClassMap.load(class_map_path(cfg)))


@task(name="stage-checks")
def checks_task(config: Dict, stage: int, subset: Dict, train: Dict[str, Optional[Dict]], evaluation: Dict,
                export: Optional[Dict], api: Optional[Dict], attestations: Optional[Dict] = None) -> Dict:
    """Every stage check measured from this run (checks.json); returns {name: {status, measured, definition, …}}.
    `attestations`: confirmations recorded ahead of the run with a person's name."""
    from pillsnap.evaluate.stage_checks import measure_stage_checks, stage_evidence
    cfg = cfg_of(config)
    with library_logs_in_run():
        rows, _ = read_subset(cfg.exp_dir, stage)
        doc = measure_stage_checks(cfg, stage_evidence(cfg, stage, rows, subset, train, evaluation, export, api),
                                   attestations)
    create_table_artifact([{"check": name, "status": c["status"], "mandatory": c["mandatory"],
                            "definition": c["definition"]} for name, c in doc.items()],
                          key=f"stage-{stage}-checks", description=f"Stage {stage}: checks (checks.json)")
    return doc


@task(name="go-no-go")
def go_no_go_task(config: Dict, stage: int, results: Dict, baseline: Optional[Dict] = None,
                  skip_reason: str = "") -> Dict:
    decision = evaluate_go_no_go(cfg_of(config).stage(stage), results, baseline, stage=stage,
                                 skip_reason=skip_reason or None).to_dict()
    write_json_atomic(_reports(config, stage) / "go_no_go.json", decision)
    return decision


@task(name="advisor-review")
def advisor_task(config: Dict, stage: int, results: Dict) -> Dict:
    advice = OptimizationAdvisor(cfg_of(config)).evaluate_and_recommend(stage, results).to_dict()
    write_json_atomic(_reports(config, stage) / "advisor.json", advice)
    return advice


@task(name="record-attestations")
def attest_task(config: Dict, stage: int, answers: Optional[Dict[str, Dict]]) -> Dict:
    """The named persons' confirmations of the attested checks (ahead of the run and in the review) folded into
    checks.json."""
    from pillsnap.evaluate.stage_checks import apply_attestations
    with library_logs_in_run():
        return apply_attestations(cfg_of(config), stage, answers)
