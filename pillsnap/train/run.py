"""Training one stage: the models of the stage's plan as members of ONE loop (loops/engine.py).

    results = train_stage(cfg, subset, class_map, stage, stage_dir, init_checkpoints, plans)
    # {"detector": TrainResult, "classifier": TrainResult}; the classifier alone with detection.enabled=false

train.strategy only changes the loop's schedule: `sequential` trains the detector's epochs, then the
classifier's; `interleaved` alternates d detector and c classifier steps (train.interleave_ratio). Everything
else (LR schedule, early stopping, OOM recovery, checkpoints, resume, telemetry) is the same in both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.core.identity import file_sha256
from pillsnap.data.class_map import ClassMap
from pillsnap.data.manifest import manifest_hash
from pillsnap.data.prepare import store_format
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.loops.engine import INTERLEAVED, EpochHook, Plans, StepHook, UnitLoop
from pillsnap.train.loops.members import Injectors, classifier_member, detector_member, run_policy
from pillsnap.train.results import TrainResult
from pillsnap.train.services.policy import Policy

MODELS = ("detector", "classifier")  # the order of a sequential run


def stage_models(cfg: PillSnapConfig) -> tuple:
    """The models a stage trains: both, or the classifier alone when the configuration has no detector."""
    return MODELS if cfg.detection.enabled else ("classifier",)


def train_stage(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, stage: int, stage_dir: Path,
                init_checkpoints: Optional[Dict[str, Optional[Path]]] = None, plans: Optional[Plans] = None,
                step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                show_progress: bool = True, policy: Optional[Policy] = None,
                compile_backend: Optional[Callable] = None, injectors: Optional[Injectors] = None,
                models: Optional[Sequence[str]] = None, comm: Optional[Collectives] = None) -> Dict[str, TrainResult]:
    """Train the stage's models in one loop; returns {model: result}.

    init_checkpoints: per model, the previous approved stage's best.pt (warm start). plans: per model, the batch
    and worker plans (the orchestrator's cached tuning). models: which of MODELS train (default: stage_models).
    comm: this process's rank among several (pillsnap/train/distributed/worker.py); default one process.
    """
    models = tuple(models or stage_models(cfg))
    unknown = set(models) - set(MODELS)
    if unknown or "classifier" not in models:
        raise ValueError(f"models={list(models)}: a stage trains the classifier, optionally with the detector")
    d, c = (int(x) for x in cfg.train.interleave_ratio)
    if cfg.train.strategy == INTERLEAVED and len(models) > 1 and (d <= 0 or c <= 0):
        raise ValueError(f"train.interleave_ratio={[d, c]}: interleaved training needs steps for both models; to "
                         "train one model after the other use train.strategy=sequential")
    stage_dir, init = Path(stage_dir), init_checkpoints or {}
    policy = run_policy(cfg, policy)
    members = []
    if "detector" in models:
        members.append(detector_member(cfg, subset, stage, stage_dir, policy, _path(init.get("detector")),
                                       compile_backend, injectors, ratio=d, comm=comm))
    members.append(classifier_member(cfg, subset, class_map, stage_dir, policy, _path(init.get("classifier")),
                                     show_progress, compile_backend, injectors, ratio=c, comm=comm))
    loop = UnitLoop(cfg, members, stage_dir, cfg.train.strategy, plans, step_hook, epoch_hook, show_progress, comm,
                    data_identity(cfg, subset, stage, init))
    return loop.run()


def data_identity(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int,
                  init_checkpoints: Mapping[str, Optional[Path]]) -> Dict[str, Any]:
    """What a run trains on and starts from, by content: the subset's row hash, the detector's cap on it (and the
    val share its rows follow) and each warm start's sha256. Part of the training fingerprint, so a run on other
    photos never resumes this one's checkpoints. JPEG rows are other pixels than raw ones: their format joins it
    (raw rows, the pixels of a fresh decode, add nothing)."""
    detector = {"detector_images": cfg.stage(stage).detector_images, "val_fraction": cfg.data.val_fraction} \
        if cfg.detection.enabled else None
    rows = store_format(cfg, samples=len(subset))[0] if cfg.dataloader.cache.enabled else None
    return {"subset": manifest_hash(subset), "detector": detector,
            "warm_start": {model: file_sha256(path) for model, path in sorted(init_checkpoints.items()) if path},
            **({"pixel_rows": f"jpeg{rows.quality}"} if rows and rows.kind == "jpeg" else {})}


def _path(value) -> Optional[Path]:
    return Path(value) if value else None
