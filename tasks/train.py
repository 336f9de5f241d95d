"""The training tasks: ONE task each holds the whole training loop.

retries: a retry resumes from the newest valid checkpoint (train.resume=last), never from scratch.
cache key: (resolved config, subset hash, code version); the flow refreshes the cache when the checkpoint
that a cached result points to is gone.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

from prefect import task

from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path
from pillsnap.data.subsets import read_subset
from pillsnap.lock import experiment_lock
from pillsnap.logs import attach_stage_files, detach
from pillsnap.train.checkpoints import prepare_checkpoint_dir, training_fingerprint
from pillsnap.train.loop import result_dict, train_classifier
from tasks.common import cfg_of, code_version, library_logs_in_run, progress_artifact, use_forkserver_workers

TRAIN_RETRIES = 2


def stage_dir(config: Dict, stage: int) -> Path:
    return Path(config["paths"]["exp_dir"]) / f"stage_{stage}"


def classifier_checkpoint(config: Dict, stage: int) -> Path:
    return stage_dir(config, stage) / "checkpoints" / "best.pt"


@contextmanager
def _training(cfg, out: Path, stage: int, model: str, progress_name: str) -> Iterator[None]:
    """Stage log files, library logs in the run, the experiment lock, and a progress artifact."""
    use_forkserver_workers()
    handlers = attach_stage_files(out / "logs")
    try:
        with library_logs_in_run(), experiment_lock(cfg.exp_dir, f"stage {stage} {model}"), \
                progress_artifact(f"stage-{stage}-{progress_name}-progress", f"Stage {stage} {model} training"):
            yield
    finally:
        detach(handlers)


def _train_key(context, parameters) -> str:
    config = parameters["config"]
    init = parameters.get("init_checkpoint") or "scratch"
    plan = parameters.get("batch_plan") or {}
    # Result storage is per experiment directory, so the key needs no path. The batch plan changes what is
    # trained (batch x accumulation); the worker count does not.
    return (f"train-classifier-s{parameters['stage']}-{training_fingerprint(config)}-{parameters['subset_hash']}-"
            f"{code_version()}-{Path(init).parent.parent.name if init != 'scratch' else init}-"
            f"b{plan.get('batch_size')}x{plan.get('grad_accum')}")


@task(name="train-classifier", retries=TRAIN_RETRIES, retry_delay_seconds=2, cache_key_fn=_train_key,
      persist_result=True)
def train_classifier_task(config: Dict, stage: int, subset_hash: str, init_checkpoint: Optional[str] = None,
                          batch_plan: Optional[Dict] = None, worker_plan: Optional[Dict] = None) -> Dict:
    cfg, out = cfg_of(config), stage_dir(config, stage)
    with _training(cfg, out, stage, "classifier", "training"):
        prepare_checkpoint_dir(out / "checkpoints", config)
        subset, _ = read_subset(cfg.exp_dir, stage)
        result = train_classifier(cfg, subset, ClassMap.load(class_map_path(cfg)), out,
                                  Path(init_checkpoint) if init_checkpoint else None,
                                  show_progress=cfg.logging.progress_bar, batch_plan=batch_plan, worker_plan=worker_plan)
    return {**result_dict(result), "tensorboard": str(out / "tb")}


def detector_checkpoint(config: Dict, stage: int) -> Path:
    return stage_dir(config, stage) / "detector" / "checkpoints" / "best.pt"


def _detector_key(context, parameters) -> str:
    config = parameters["config"]
    return (f"{context.task.name}-s{parameters['stage']}-{training_fingerprint(config)}-{parameters['subset_hash']}-"
            f"{code_version()}")


@task(name="train-detector", retries=TRAIN_RETRIES, retry_delay_seconds=2, cache_key_fn=_detector_key,
      persist_result=True)
def train_detector_task(config: Dict, stage: int, subset_hash: str) -> Dict:
    """The detector (sequential), or both models in one interleaved loop (train.strategy=interleaved)."""
    from pillsnap.train.detector import train_detector

    cfg, out = cfg_of(config), stage_dir(config, stage)
    with _training(cfg, out, stage, "detector", "detector"):
        subset, _ = read_subset(cfg.exp_dir, stage)
        result = train_detector(cfg, subset, stage, stage_dir=out, class_map=ClassMap.load(class_map_path(cfg)),
                                show_progress=cfg.logging.progress_bar)
    return result.as_dict()
