"""The training task: ONE task holds the stage's whole training loop (both models, either strategy).

retries: only where a retry can help (a crash, an exhausted OOM recovery, a lost DataLoader worker); it resumes
from the newest valid checkpoint of the same training (train.resume=last). A configuration or data error (a bad
value, a missing file, a class-map mismatch, no data for a split, no pretrained weights offline) fails at once.
cache key: the training fingerprint (resolved config + batch plans), the world size, the subset hash, the warm
start's sha256 and the code version; the flow recomputes a cached result whose best.pt on disk is not the file it
recorded (tasks.common.fresh_result).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from prefect import task

from pillsnap.config import ConfigError, DistributedConfig, pick
from pillsnap.core import layout
from pillsnap.core.checkpoints import CheckpointMismatchError
from pillsnap.core.identity import ArtifactChanged, sha256_or_none, short
from pillsnap.data.cache import CacheSpaceError
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.lock import ExperimentBusy, experiment_lock
from pillsnap.logs import attach_stage_files, detach
from pillsnap.models.pretrained import PretrainedWeightsUnavailable
from pillsnap.train import train_stage
from pillsnap.train.distributed.launch import DistributedRunFailed, run_training_processes
from pillsnap.train.distributed.world import launch_spec
from pillsnap.train.results import check_trained_on
from pillsnap.train.services.checkpoint_policy import training_fingerprint
from pillsnap.train.services.loss_monitors import NonFiniteLossError
from pillsnap.train.preflight import PreflightError
from tasks.common import cfg_of, code_version, library_logs_in_run, progress_artifact, use_forkserver_workers

TRAIN_RETRIES = 2
# Errors that a retry would only repeat: wrong settings or data, missing files, a deterministic NaN.
PERMANENT_ERRORS = (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, CheckpointMismatchError,
                    PretrainedWeightsUnavailable, PreflightError, CacheSpaceError, NonFiniteLossError, ExperimentBusy,
                    ArtifactChanged)


def retry_helps(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a crash, an exhausted OOM recovery, a lost worker; nothing permanent
    (also when a rank of a distributed run raised it)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - a result that cannot be read is the failure itself
        error = e
    if isinstance(error, DistributedRunFailed):
        return error.exception_type not in {e.__name__ for e in PERMANENT_ERRORS}
    return not isinstance(error, PERMANENT_ERRORS)


@contextmanager
def _training(config: Dict, stage: int) -> Iterator:
    """Stage log files, library logs in the run, the experiment lock, and a progress artifact."""
    use_forkserver_workers()
    cfg = cfg_of(config)
    out = layout.stage_dir(cfg.exp_dir, stage)
    handlers = attach_stage_files(layout.logs_dir(out))
    try:
        with library_logs_in_run(), experiment_lock(cfg.exp_dir, f"stage {stage} training"), \
                progress_artifact(f"stage-{stage}-training-progress", f"Stage {stage} training"):
            yield cfg, out
    finally:
        detach(handlers)


def _world_size(config: Dict) -> int:
    return launch_spec(DistributedConfig(**pick(config, "train.distributed"))).world_size


def _train_key(context, parameters) -> str:
    """Result storage is per experiment directory, so the key needs no path. The world size is in it as resolved
    on this machine (nproc_per_node=auto is not a number); the warm start by its content."""
    init = parameters.get("init_checkpoints") or {}
    sources = "-".join(f"{k}:{short(sha256_or_none(v))}" for k, v in sorted(init.items()) if v) or "scratch"
    plans = {model: (p or {}).get("batch") for model, p in (parameters.get("plans") or {}).items()}
    return (f"{context.task.name}-s{parameters['stage']}-{training_fingerprint(parameters['config'], plans)}-"
            f"w{_world_size(parameters['config'])}-{parameters['subset_hash']}-{code_version()}-{sources}")


@task(name="train", retries=TRAIN_RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_helps,
      cache_key_fn=_train_key, persist_result=True)
def train_task(config: Dict, stage: int, subset_hash: str, init_checkpoints: Optional[Dict] = None,
               plans: Optional[Dict] = None) -> Dict[str, Dict]:
    """The stage's models in ONE loop (train.strategy: sequential or interleaved): {model: result}. With a world
    size above 1 the loop runs under torchrun, a child of this task (pillsnap/train/distributed/launch.py)."""
    with _training(config, stage) as (cfg, out):
        subset, _ = read_subset(cfg.exp_dir, stage, subset_hash)  # the subset this run was given, by content
        spec = launch_spec(cfg.train.distributed)
        if spec.distributed:
            results = run_training_processes(config, stage, out, init_checkpoints, plans, spec)
        else:
            results = {name: result.as_dict() for name, result in train_stage(
                cfg, subset, ClassMap.load(class_map_path(cfg)), stage, out, init_checkpoints, plans,
                show_progress=cfg.logging.progress_bar).items()}
    return check_trained_on(results, subset_hash)
