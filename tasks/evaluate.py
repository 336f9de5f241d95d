"""Evaluation and decision tasks: evaluate on the stage's val split, Go/No-Go, advisor review."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from prefect import task

from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.evaluate.advisor import OptimizationAdvisor
from pillsnap.evaluate.go_no_go import evaluate_go_no_go
from pillsnap.evaluate.stage_eval import evaluate_classifier
from tasks.common import cfg_of, library_logs_in_run


@task(name="evaluate-stage")
def evaluate_task(config: Dict, stage: int, checkpoint: str, batch_size: Optional[int] = None) -> Dict:
    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        return evaluate_classifier(cfg, Path(checkpoint), subset, ClassMap.load(class_map_path(cfg)),
                                   cfg.exp_dir / f"stage_{stage}" / "reports", batch_size)


@task(name="go-no-go")
def go_no_go_task(config: Dict, stage: int, results: Dict, baseline: Optional[Dict] = None) -> Dict:
    return evaluate_go_no_go(cfg_of(config).stage(stage), results, baseline, stage=stage).to_dict()


@task(name="advisor-review")
def advisor_task(config: Dict, stage: int, results: Dict) -> Dict:
    return OptimizationAdvisor(cfg_of(config)).evaluate_and_recommend(stage, results).to_dict()


@task(name="combination-accuracy")
def combination_task(config: Dict, stage: int) -> Dict:
    from pillsnap.evaluate.stage_detection import combination_accuracy
    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        return combination_accuracy(cfg, stage, subset, ClassMap.load(class_map_path(cfg)))
