"""Stage settings (D-13), the stage plan, model verification, and the auto-batch / worker plans of both models.

The plans are cached per machine + model + image size + settings: re-running a stage on the same box skips the
probes, and a new GPU, image size or batch setting measures again.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, Tuple

from prefect import task

from pillsnap.core import layout
from pillsnap.config import to_dict
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.train import stage_config, tune_batch, tune_workers
from pillsnap.train.tuning.plans import tuning_fingerprint
from tasks.common import cfg_of, library_logs_in_run, use_forkserver_workers


@task(name="stage-settings")
def stage_settings_task(config: Dict, stage: int) -> Tuple[Dict, list]:
    with library_logs_in_run():
        cfg, changes = stage_config(cfg_of(config), stage)
    return to_dict(cfg), changes


@task(name="plan-stage")
def plan_stage_task(config: Dict, stage: int, without_approved_predecessor: str = "") -> Dict:
    """Which models train and how, the warm start and the regression baseline; refuses a stage that may not run
    (StageRefused) before any work."""
    from pillsnap.stage_plan import plan_stage

    return plan_stage(cfg_of(config), stage, without_approved_predecessor).to_dict()


@task(name="verify-models")
def verify_models_task(config: Dict, stage: int) -> Dict:
    """Fail before training if the classifier name is unknown or the detector's activation did not apply."""
    import timm

    cfg = cfg_of(config)
    if not timm.is_model(cfg.classification.backbone):
        raise ValueError(f"classification.backbone={cfg.classification.backbone!r} is not a timm model")
    out = {"classifier": cfg.classification.backbone}
    if cfg.detection.enabled:
        from pillsnap.models.detector import verify_detector
        with library_logs_in_run():
            out["detector"] = verify_detector(cfg.detection, layout.detector_model_dir(layout.stage_dir(cfg.exp_dir, stage)))
    return out


def _machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{platform.node()}-{os.cpu_count()}-{gpu}".replace(" ", "_").replace("/", "_")


def _tuning_key(context, parameters) -> str:
    model = parameters["model"]
    return (f"{context.task.name}-{model}-"
            f"{tuning_fingerprint(parameters['config'], model, _machine(), parameters.get('batch_size'))}")


def _stage_data(config: Dict, stage: int):
    use_forkserver_workers()
    cfg = cfg_of(config)
    return cfg, read_subset(cfg.exp_dir, stage)[0], ClassMap.load(class_map_path(cfg))


@task(name="auto-batch", cache_key_fn=_tuning_key, persist_result=True)
def auto_batch_task(config: Dict, stage: int, model: str) -> Dict:
    with library_logs_in_run():
        cfg, subset, class_map = _stage_data(config, stage)
        return tune_batch(cfg, subset, class_map, model, stage)


@task(name="autotune-workers", cache_key_fn=_tuning_key, persist_result=True)
def autotune_workers_task(config: Dict, stage: int, model: str, batch_size: int) -> Dict:
    with library_logs_in_run():
        cfg, subset, class_map = _stage_data(config, stage)
        return tune_workers(cfg, subset, class_map, model, stage, batch_size)
