"""Evaluation and decision tasks: evaluate on the stage's val split, combination accuracy, the stage checks, the
stage's typed results, Go/No-Go and the advisor (each decision also written to stage_<n>/reports/)."""
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
from pillsnap.evaluate.results import StageResults, stage_results
from pillsnap.evaluate.classifier_eval import evaluate_classifier
from tasks.common import cfg_of, library_logs_in_run


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
                                   layout.reports_dir(cfg.exp_dir, stage), batch_size, previous)


@task(name="combination-accuracy")
def combination_task(config: Dict, stage: int) -> Dict:
    from pillsnap.evaluate.detector_eval import combination_accuracy
    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        return combination_accuracy(cfg, stage, subset, ClassMap.load(class_map_path(cfg)))


@task(name="stage-checks")
def checks_task(config: Dict, stage: int, subset: Dict, train: Dict[str, Optional[Dict]], evaluation: Dict,
                export: Optional[Dict], api: Optional[Dict], attestations: Optional[Dict] = None) -> Dict:
    """Every stage check measured from this run (checks.json); returns {name: {status, measured, definition, …}}.
    `attestations`: confirmations recorded ahead of the run with a person's name."""
    from pillsnap.evaluate.checks.evidence import measure_stage_checks, stage_evidence
    cfg = cfg_of(config)
    with library_logs_in_run():
        rows, _ = read_subset(cfg.exp_dir, stage)
        doc = measure_stage_checks(cfg, stage_evidence(cfg, stage, rows, subset, train, evaluation, export, api),
                                   attestations)
    create_table_artifact([{"check": name, "status": c["status"], "mandatory": c["mandatory"],
                            "definition": c["definition"]} for name, c in doc.items()],
                          key=f"stage-{stage}-checks", description=f"Stage {stage}: checks (checks.json)")
    return doc


@task(name="stage-results")
def stage_results_task(stage: int, evaluation: Dict, trained: Dict[str, Dict], validation: Dict, subset: Dict,
                       checks: Dict[str, Dict], detection: Optional[Dict], api: Optional[Dict]) -> Dict:
    """The stage's typed results, built once from what its tasks returned (as a dict at the task boundary)."""
    statuses = {name: c["status"] for name, c in checks.items()}
    return stage_results(stage, evaluation, trained, validation, subset, statuses, detection, api).to_dict()


@task(name="go-no-go")
def go_no_go_task(config: Dict, stage: int, results: Dict, baseline: Optional[Dict] = None,
                  skip_reason: str = "") -> Dict:
    cfg = cfg_of(config)
    decision = evaluate_go_no_go(cfg.stage(stage), StageResults.from_dict(results), baseline,
                                 stage=stage, skip_reason=skip_reason or None).to_dict()
    write_json_atomic(layout.reports_dir(cfg.exp_dir, stage) / "go_no_go.json", decision)
    return decision


@task(name="advisor-review")
def advisor_task(config: Dict, stage: int, results: Dict) -> Dict:
    cfg = cfg_of(config)
    doc = OptimizationAdvisor(cfg).evaluate_and_recommend(stage, StageResults.from_dict(results)).to_dict()
    write_json_atomic(layout.reports_dir(cfg.exp_dir, stage) / "advisor.json", doc)
    return doc


@task(name="record-attestations")
def attest_task(config: Dict, stage: int, answers: Optional[Dict[str, Dict]]) -> Dict:
    """The named persons' confirmations of the attested checks (ahead of the run and in the review) folded into
    checks.json."""
    from pillsnap.evaluate.checks.evidence import apply_attestations
    with library_logs_in_run():
        return apply_attestations(cfg_of(config), stage, answers)
