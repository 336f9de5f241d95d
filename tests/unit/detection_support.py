"""Shared, session-wide material for the detector tests: one tiny synthetic set and two trained runs (one per
strategy, both through the one engine).

Fixtures here are imported by several test modules; pytest then registers them once per module, so each body
memoises its result for the whole session (the data is synthesised once, each training runs once).
The data: 6 classes, 8 combination folders x 4 photos of 2-5 pills at 160x200 px (24 train / 8 val images), plus
6 single-pill photos per class for the classifier side of the interleaved run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import pandas as pd
import pytest

from pillsnap.config import PillSnapConfig, load_config

_CACHE: Dict[str, Any] = {}
SEQ_EPOCHS, SEQ_CRASH_AFTER, SEQ_BATCH = 10, 3, 4  # batch 4: 60 steps learn the pills reliably, 30 do not
SEQ_STEPS_PER_EPOCH = 24 // SEQ_BATCH
INT_EPOCHS, INT_CRASH_AT_STEP = 4, 10


class SimulatedInterruption(RuntimeError):
    pass


def det_config(exp_dir: Path, *overrides: str) -> PillSnapConfig:
    """The ci profile with a YOLO11n at 160 px: small enough for 2 CPU cores, big enough to learn the pills."""
    return load_config(profile="ci", overrides=[
        f"paths.exp_dir={exp_dir}", "detection.scale=n", "detection.image_size=160", "detection.activation=relu",
        f"train.detection.batch_size={SEQ_BATCH}", "train.detection.lr=0.005", f"train.detection.epochs={SEQ_EPOCHS}",
        "train.warmup_steps=3", "train.early_stopping.patience=50", "train.grad_accum_steps=1",
        "classification.backbone=test_efficientnet", "classification.image_size=32",
        "train.classification.batch_size=8", "train.classification.lr=0.003", "dataloader.num_workers=0",
        "dataloader.cache.enabled=false", "logging.progress_bar=false", "optimization.amp=false",
        "detection.include_single_images=false",  # the step arithmetic below counts the combination photos
        "optimization.torch_compile=none", "optimization.channels_last=false", *overrides])


@dataclass
class TinyData:
    root: Path
    manifest: pd.DataFrame

    def rows(self, split: str, kind: str = "combination") -> pd.DataFrame:
        m = self.manifest
        return m[(m["split"] == split) & (m["kind"] == kind)]


@dataclass
class Run:
    first_error: BaseException
    result: Any
    losses: Dict[str, List[float]] = field(default_factory=dict)
    epochs_after_resume: List[int] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)  # global step of every training batch, both calls
    exp_dir: Path = Path()


@pytest.fixture(scope="session")
def det_data(tmp_path_factory) -> TinyData:
    if "data" not in _CACHE:
        from pillsnap.data.aihub import import_aihub
        from pillsnap.data.manifest import assign_splits
        from pillsnap.data.synth import synthesize

        root = tmp_path_factory.mktemp("detdata")
        cfg = det_config(root / "exp", "synth.num_classes=6", "synth.images_per_class=6",
                         "synth.test_images_per_class=0", "synth.combinations=8", "synth.test_combinations=0",
                         "synth.images_per_combination=4", "synth.width=160", "synth.height=200",
                         f"synth.workers={min(2, os.cpu_count() or 1)}")
        synthesize(cfg.synth, root / "aihub", show_progress=False)
        manifest = assign_splits(import_aihub(root / "aihub", show_progress=False).manifest, 0.25, 0)
        _CACHE["data"] = TinyData(root, manifest)
    return _CACHE["data"]


def _train(cfg: PillSnapConfig, data: TinyData, exp: Path, **kwargs):
    from pillsnap.data.class_map import build_class_map
    from pillsnap.train import train_stage

    return train_stage(cfg, data.manifest, build_class_map(data.manifest), 1, exp / "stage_1", show_progress=False,
                       **kwargs)


@pytest.fixture(scope="session")
def sequential_run(det_data: TinyData, tmp_path_factory) -> Run:
    """Sequential training (the detector's 10 epochs, then the classifier's) interrupted after the detector's 3rd
    epoch, then resumed; result: both models."""
    if "sequential" not in _CACHE:
        exp = tmp_path_factory.mktemp("seq") / "exp"
        cfg = det_config(exp, "train.strategy=sequential", "train.classification.epochs=2")
        run = Run(first_error=RuntimeError("no interruption happened"), result=None, exp_dir=exp,
                  losses={"detector": [], "classifier": []})

        def crash(model: str, epoch: int, record: Dict) -> None:
            if model == "detector" and epoch == SEQ_CRASH_AFTER:
                raise SimulatedInterruption(f"interrupted after epoch {epoch}")

        def collect(step: int, loss: float, which: str) -> None:
            run.losses[which].append(loss)
            if which == "detector":
                run.steps.append(step)

        def after_resume(model: str, epoch: int, record: Dict) -> None:
            if model == "detector":
                run.epochs_after_resume.append(epoch)

        try:
            _train(cfg, det_data, exp, step_hook=collect, epoch_hook=crash)
        except SimulatedInterruption as e:
            run.first_error = e
        run.result = _train(cfg, det_data, exp, step_hook=collect, epoch_hook=after_resume)
        _CACHE["sequential"] = run
    return _CACHE["sequential"]


@pytest.fixture(scope="session")
def interleaved_run(det_data: TinyData, tmp_path_factory) -> Run:
    """Interleaved training (1:1) interrupted at tick 10, then resumed from its newest checkpoint; result: both models."""
    if "interleaved" not in _CACHE:
        exp = tmp_path_factory.mktemp("inter") / "exp"
        cfg = det_config(exp, "train.strategy=interleaved", "train.interleave_ratio=[1,1]",
                         "detection.activation=leaky_relu", f"train.detection.epochs={INT_EPOCHS}",
                         "train.detection.batch_size=8", "train.detection.lr=0.01",
                         f"train.classification.epochs={INT_EPOCHS}", "train.recovery_every_steps=4")
        run = Run(first_error=RuntimeError("no interruption happened"), result=None, exp_dir=exp,
                  losses={"detector": [], "classifier": []})

        def collect(step: int, loss: float, which: str) -> None:
            run.losses[which].append(loss)
            run.steps.append(step)
            if step == INT_CRASH_AT_STEP and not isinstance(run.first_error, SimulatedInterruption):
                run.first_error = SimulatedInterruption(f"interrupted at step {step}")
                raise run.first_error

        try:
            _train(cfg, det_data, exp, step_hook=collect)
        except SimulatedInterruption:
            pass
        run.result = _train(cfg, det_data, exp, step_hook=collect,
                            epoch_hook=lambda model, epoch, record: run.epochs_after_resume.append((model, epoch)))
        _CACHE["interleaved"] = run
    return _CACHE["interleaved"]


def mean(values: List[float]) -> float:
    return sum(values) / len(values)
