"""Building the loop's members (unit + data + files) and the run-wide settings (seed, device policy)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.core import layout
from pillsnap.data.class_map import ClassMap
from pillsnap.data.yolo_dataset import detector_facts
from pillsnap.train.data import classifier_data, detector_data, stage_label_space
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.loops.engine import Member
from pillsnap.train.services.oom_state_machine import FaultInjector
from pillsnap.train.services.policy import Policy, apply_global_settings, resolve_policy, set_seed
from pillsnap.train.units.classifier import ClassifierUnit
from pillsnap.train.units.detector import DetectorUnit, detector_hyperparameters

log = logging.getLogger(__name__)
Injectors = Dict[str, FaultInjector]


def run_policy(cfg: PillSnapConfig, policy: Optional[Policy] = None) -> Policy:
    """Seeding (D-11), then the device / precision / compile policy (Annex 3), with one log line."""
    set_seed(cfg.train.seed, cfg.train.deterministic)
    policy = policy or resolve_policy(cfg.optimization)
    apply_global_settings(policy, cfg.train.deterministic)
    log.info("training policy: %s", policy.describe())
    return policy


def _injector(cfg: PillSnapConfig, name: str, injectors: Optional[Injectors], comm: Collectives) -> FaultInjector:
    if injectors and name in injectors:
        return injectors[name]
    oom = cfg.train.oom
    if oom.inject_rank is not None and oom.inject_rank != comm.rank:
        return FaultInjector()
    return FaultInjector.from_steps(oom.inject_at_steps if name == "classifier" else oom.inject_detector_at_steps)


def classifier_member(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, stage_dir: Path,
                      policy: Policy, init_checkpoint: Optional[Path] = None, show_progress: bool = True,
                      compile_backend: Optional[Callable] = None, injectors: Optional[Injectors] = None,
                      ratio: int = 1, comm: Optional[Collectives] = None) -> Member:
    comm = comm or Collectives()
    labels = stage_label_space(subset, class_map)
    data = classifier_data(cfg, subset, labels, policy.device, show_progress, comm.rank, comm.world_size)
    unit = ClassifierUnit(cfg, labels, data.train_samples.labels, policy, data.train_samples.image_ids,
                          data.val_loader, init_checkpoint, compile_backend, comm.world_size)
    facts = {"train_samples": len(data.train_samples.samples), "val_samples": len(data.val_samples.samples),
             "pixel_cache": data.train.dataset.cache_coverage()}
    return Member(cfg, unit, data.train, Path(stage_dir), "classification",
                  _injector(cfg, "classifier", injectors, comm), ratio, facts, comm)


def detector_member(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Path, policy: Policy,
                    init_checkpoint: Optional[Path] = None, compile_backend: Optional[Callable] = None,
                    injectors: Optional[Injectors] = None, ratio: int = 1,
                    comm: Optional[Collectives] = None) -> Member:
    comm = comm or Collectives()
    data = detector_data(cfg, subset, stage, detector_hyperparameters(cfg), cfg.train.detection.epochs)
    unit = DetectorUnit(cfg, policy, layout.detector_model_dir(stage_dir), data.val_samples, data.val_read,
                        init_checkpoint, compile_backend, comm.world_size)
    return Member(cfg, unit, data.train, Path(stage_dir), "detection", _injector(cfg, "detector", injectors, comm),
                  ratio, detector_facts(data.yolo), comm)
