"""The training tasks: ONE task holds a whole training loop (both models in one task when interleaved).

retries: only where a retry can help (a crash, an exhausted OOM recovery, a lost DataLoader worker); it resumes
from the newest valid checkpoint of the same training (train.resume=last). A configuration or data error (a bad
value, a missing file, a class-map mismatch, no data for a split, no pretrained weights offline) fails at once.
cache key: the training fingerprint (resolved config + batch plans), the subset hash, the warm-start source and
the code version; the flow refreshes the cache when a checkpoint that a cached result points to is gone.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

from prefect import task

from pillsnap.config import ConfigError
from pillsnap.core import layout
from pillsnap.core.checkpoints import CheckpointMismatchError
from pillsnap.data.cache import CacheSpaceError
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.lock import ExperimentBusy, experiment_lock
from pillsnap.logs import attach_stage_files, detach
from pillsnap.models.pretrained import PretrainedWeightsUnavailable
from pillsnap.train import train_classifier, train_detector, train_interleaved
from pillsnap.train.services.checkpointer import training_fingerprint
from pillsnap.train.services.monitors import NonFiniteLossError
from pillsnap.train.setup.prechecks import PrecheckError
from tasks.common import cfg_of, code_version, library_logs_in_run, progress_artifact, use_forkserver_workers

TRAIN_RETRIES = 2
# Errors that a retry would only repeat: wrong settings or data, missing files, a deterministic NaN.
PERMANENT_ERRORS = (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, CheckpointMismatchError,
                    PretrainedWeightsUnavailable, PrecheckError, CacheSpaceError, NonFiniteLossError, ExperimentBusy)


def retry_helps(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a crash, an exhausted OOM recovery, a lost worker; nothing permanent."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - a result that cannot be read is the failure itself
        error = e
    return not isinstance(error, PERMANENT_ERRORS)


def stage_dir(config: Dict, stage: int) -> Path:
    return layout.stage_dir(Path(config["paths"]["exp_dir"]), stage)


@contextmanager
def _training(config: Dict, stage: int, what: str, progress_name: str) -> Iterator:
    """Stage log files, library logs in the run, the experiment lock, and a progress artifact."""
    use_forkserver_workers()
    cfg, out = cfg_of(config), stage_dir(config, stage)
    handlers = attach_stage_files(out / "logs")
    try:
        with library_logs_in_run(), experiment_lock(cfg.exp_dir, f"stage {stage} {what}"), \
                progress_artifact(f"stage-{stage}-{progress_name}-progress", f"Stage {stage} {what} training"):
            subset, _ = read_subset(cfg.exp_dir, stage)
            yield cfg, subset, ClassMap.load(class_map_path(cfg)), out
    finally:
        detach(handlers)


def _train_key(context, parameters) -> str:
    """Result storage is per experiment directory, so the key needs no path."""
    init = parameters.get("init_checkpoints") or {}
    sources = "-".join(f"{k}:{Path(v).parent.parent.name}" for k, v in sorted(init.items()) if v) or "scratch"
    plans = {model: (p or {}).get("batch") for model, p in (parameters.get("plans") or {}).items()}
    return (f"{context.task.name}-s{parameters['stage']}-{training_fingerprint(parameters['config'], plans)}-"
            f"{parameters['subset_hash']}-{code_version()}-{sources}")


def _optional(path: Optional[str]) -> Optional[Path]:
    return Path(path) if path else None


TRAIN_TASK = dict(retries=TRAIN_RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_helps,
                  cache_key_fn=_train_key, persist_result=True)


@task(name="train-classifier", **TRAIN_TASK)
def train_classifier_task(config: Dict, stage: int, subset_hash: str, init_checkpoints: Optional[Dict] = None,
                          plans: Optional[Dict] = None) -> Dict:
    with _training(config, stage, "classifier", "training") as (cfg, subset, class_map, out):
        result = train_classifier(cfg, subset, class_map, out, _optional((init_checkpoints or {}).get("classifier")),
                                  (plans or {}).get("classifier"), show_progress=cfg.logging.progress_bar)
    return result.as_dict()


@task(name="train-detector", **TRAIN_TASK)
def train_detector_task(config: Dict, stage: int, subset_hash: str, init_checkpoints: Optional[Dict] = None,
                        plans: Optional[Dict] = None) -> Dict:
    with _training(config, stage, "detector", "detector") as (cfg, subset, _, out):
        result = train_detector(cfg, subset, stage, out, _optional((init_checkpoints or {}).get("detector")),
                                (plans or {}).get("detector"), show_progress=cfg.logging.progress_bar)
    return result.as_dict()


@task(name="train-interleaved", **TRAIN_TASK)
def train_interleaved_task(config: Dict, stage: int, subset_hash: str, init_checkpoints: Optional[Dict] = None,
                           plans: Optional[Dict] = None) -> Dict:
    """Both models in ONE loop (train.strategy=interleaved): {"classifier": result, "detector": result}."""
    with _training(config, stage, "detector + classifier", "training") as (cfg, subset, class_map, out):
        init = {k: _optional(v) for k, v in (init_checkpoints or {}).items()}
        results = train_interleaved(cfg, subset, class_map, stage, out, init, plans,
                                    show_progress=cfg.logging.progress_bar)
    return {name: result.as_dict() for name, result in results.items()}
