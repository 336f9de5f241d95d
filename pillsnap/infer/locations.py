"""Where a stage's models and exports live (the experiment-directory layout of ARCHITECTURE.md).

<exp_dir>/stage_<n>/checkpoints/best.pt            the classifier (pillsnap.train.loop)
<exp_dir>/stage_<n>/detector/checkpoints/best.pt   the detector (pillsnap.train.detector / interleaved)
<exp_dir>/stage_<n>/export/{classifier,detector}.onnx, export_report.json
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from pillsnap.config import PillSnapConfig

CLASSIFIER_ONNX = "classifier.onnx"
DETECTOR_ONNX = "detector.onnx"
EXPORT_REPORT = "export_report.json"


def stage_dir(cfg: PillSnapConfig, stage: int) -> Path:
    return cfg.exp_dir / f"stage_{stage}"


def classifier_checkpoint(cfg: PillSnapConfig, stage: int) -> Path:
    return stage_dir(cfg, stage) / "checkpoints" / "best.pt"


def detector_checkpoint(cfg: PillSnapConfig, stage: int) -> Path:
    # Same place the detector trainers write (pillsnap.train.detector.detector_dir), spelt out here so that
    # serving does not import the training stack.
    return stage_dir(cfg, stage) / "detector" / "checkpoints" / "best.pt"


def export_dir(cfg: PillSnapConfig, stage: int) -> Path:
    return stage_dir(cfg, stage) / "export"


def latest_trained_stage(cfg: PillSnapConfig) -> Optional[int]:
    """The highest stage that has a classifier best.pt, or None."""
    found = []
    for path in cfg.exp_dir.glob("stage_*"):
        match = re.fullmatch(r"stage_(\d+)", path.name)
        if match and (path / "checkpoints" / "best.pt").is_file():
            found.append(int(match.group(1)))
    return max(found) if found else None
