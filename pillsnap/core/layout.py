"""The experiment-directory layout of ARCHITECTURE.md, in one place (training, evaluation and serving read it).

<exp_dir>/stage_<n>/checkpoints/{best,last,recovery}.pt      the classifier (last/recovery: the whole run's state)
<exp_dir>/stage_<n>/detector/checkpoints/{best,last}.pt      the detector
<exp_dir>/stage_<n>/{tb, detector/tb}                        TensorBoard, one folder per model
<exp_dir>/stage_<n>/reports/                                 metrics.json, checks.json, go_no_go.json, …
<exp_dir>/stage_<n>/export/{classifier,detector}.onnx, export_report.json
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CLASSIFIER_ONNX = "classifier.onnx"
DETECTOR_ONNX = "detector.onnx"
EXPORT_REPORT = "export_report.json"


def stage_dir(exp_dir: Path, stage: int) -> Path:
    return Path(exp_dir) / f"stage_{stage}"


def checkpoint_dir(exp_dir: Path, stage: int) -> Path:
    return stage_dir(exp_dir, stage) / "checkpoints"


def classifier_checkpoint(exp_dir: Path, stage: int) -> Path:
    return checkpoint_dir(exp_dir, stage) / "best.pt"


def detector_dir(exp_dir: Path, stage: int) -> Path:
    return stage_dir(exp_dir, stage) / "detector"


def detector_checkpoint(exp_dir: Path, stage: int) -> Path:
    return detector_dir(exp_dir, stage) / "checkpoints" / "best.pt"


def reports_dir(exp_dir: Path, stage: int) -> Path:
    return stage_dir(exp_dir, stage) / "reports"


def export_dir(exp_dir: Path, stage: int) -> Path:
    return stage_dir(exp_dir, stage) / "export"


def latest_trained_stage(exp_dir: Path) -> Optional[int]:
    """The highest stage that has a classifier best.pt, or None."""
    found = []
    for path in Path(exp_dir).glob("stage_*"):
        match = re.fullmatch(r"stage_(\d+)", path.name)
        if match and (path / "checkpoints" / "best.pt").is_file():
            found.append(int(match.group(1)))
    return max(found) if found else None
