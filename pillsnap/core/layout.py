"""The experiment directory, in ONE place: every module asks here for a path, none builds one by hand.

<exp_dir>/config.resolved.yaml (the newest run's), config.resolved.<run>.yaml (every run's), ledger.json
<exp_dir>/data/                                           manifest, class map, validation reports, cache/
<exp_dir>/data/stage_<n>/                                 the stage's subset (subset.csv, subset.json, yolo/)
<exp_dir>/data/shards/                                    each finished data-preparation shard's result
<exp_dir>/stage_<n>/                                      one stage's run ("the stage folder"):
    checkpoints/{best,last,recovery,emergency}.pt         the classifier (last/recovery/emergency: the whole run)
    tb/                                                   the classifier's TensorBoard
    detector/{checkpoints/{best,last}.pt, tb/, model/}    the detector's files and generated model yaml
    reports/                                              metrics.json, checks.json, go_no_go.json, …, detections/
    export/{classifier,detector}.onnx, export_report.json
    decided/<model>-<sha256[:16]>.pt                      each model a decision judged, by content (copies)
    logs/{train.out,train.err}
<exp_dir>/final/{reports/final_test_results*.json, data/test_manifest.csv}

Functions taking `stage_folder` work on a stage folder wherever it is (tests and benches train into temporary
ones); the others take (exp_dir, stage).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CLASSIFIER_ONNX = "classifier.onnx"
DETECTOR_ONNX = "detector.onnx"
EXPORT_REPORT = "export_report.json"
BEST, LAST = "best.pt", "last.pt"


# ---------------------------------------------------------------------------------------------- the experiment
def resolved_config(exp_dir: Path, run: Optional[str] = None) -> Path:
    """The newest run's resolved config, or run `run`'s (every run keeps its own)."""
    return Path(exp_dir) / (f"config.resolved.{run}.yaml" if run else "config.resolved.yaml")


def ledger(exp_dir: Path) -> Path:
    return Path(exp_dir) / "ledger.json"


def data_dir(exp_dir: Path) -> Path:
    return Path(exp_dir) / "data"


def shard_results_dir(exp_dir: Path) -> Path:
    return data_dir(exp_dir) / "shards"


def stage_data_dir(exp_dir: Path, stage: int) -> Path:
    """The stage's subset (subset.csv, subset.json) and its YOLO dataset."""
    return data_dir(exp_dir) / f"stage_{stage}"


def final_reports_dir(exp_dir: Path) -> Path:
    return Path(exp_dir) / "final" / "reports"


def final_data_dir(exp_dir: Path) -> Path:
    return Path(exp_dir) / "final" / "data"


# ---------------------------------------------------------------------------------------------- a stage folder
def stage_dir(exp_dir: Path, stage: int) -> Path:
    return Path(exp_dir) / f"stage_{stage}"


def model_dir(stage_folder: Path, model: str) -> Path:
    """The classifier's files sit at the top of the stage folder, the detector's in detector/."""
    return Path(stage_folder) if model == "classifier" else Path(stage_folder) / "detector"


def checkpoints_dir(stage_folder: Path, model: str = "classifier") -> Path:
    return model_dir(stage_folder, model) / "checkpoints"


def tensorboard_dir(stage_folder: Path, model: str) -> Path:
    return model_dir(stage_folder, model) / "tb"


def detector_model_dir(stage_folder: Path) -> Path:
    """Where the generated detector yaml is written."""
    return model_dir(stage_folder, "detector") / "model"


def stage_reports_dir(stage_folder: Path) -> Path:
    return Path(stage_folder) / "reports"


def logs_dir(stage_folder: Path) -> Path:
    return Path(stage_folder) / "logs"


# ---------------------------------------------------------------------------------------------- (exp_dir, stage)
def best_checkpoint(exp_dir: Path, stage: int, model: str) -> Path:
    return checkpoints_dir(stage_dir(exp_dir, stage), model) / BEST


def classifier_checkpoint(exp_dir: Path, stage: int) -> Path:
    return best_checkpoint(exp_dir, stage, "classifier")


def detector_checkpoint(exp_dir: Path, stage: int) -> Path:
    return best_checkpoint(exp_dir, stage, "detector")


def decided_model(exp_dir: Path, stage: int, model: str, sha256: str) -> Path:
    """A model a decision judged, named by its content: a later run of the stage never overwrites it."""
    return stage_dir(exp_dir, stage) / "decided" / f"{model}-{sha256[:16]}.pt"


def reports_dir(exp_dir: Path, stage: int) -> Path:
    return stage_reports_dir(stage_dir(exp_dir, stage))


def export_dir(exp_dir: Path, stage: int) -> Path:
    return stage_dir(exp_dir, stage) / "export"


def latest_trained_stage(exp_dir: Path) -> Optional[int]:
    """The highest stage that has a classifier best.pt, or None."""
    found = []
    for path in Path(exp_dir).glob("stage_*"):
        match = re.fullmatch(r"stage_(\d+)", path.name)
        if match and (checkpoints_dir(path) / BEST).is_file():
            found.append(int(match.group(1)))
    return max(found) if found else None
