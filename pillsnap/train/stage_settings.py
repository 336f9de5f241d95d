"""D-13: per-stage hardware settings. Returns a modified COPY of the config and the list of changes.

Applied in this order, so that what a person wrote for a stage always wins over a generic heuristic:
  1. dataset-size heuristics: stage <= 2 (small) caps auto-batch maxima and avoids max-autotune compile cost;
     stage >= 3 (large) compiles with max-autotune, uses channels_last, raises the VRAM headroom to 0.92;
  2. train.stage_overrides["stage_<n>"]: batch_size_override -> train.classification.batch_size,
     compile_mode -> optimization.torch_compile, memory_format -> optimization.channels_last,
     num_workers_override -> dataloader.num_workers.
The returned config is what must be resolved, saved and logged: a run must do what its config says.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Optional, Tuple

from pillsnap.config import ConfigError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("none", "reduce-overhead", "max-autotune")
MEMORY_FORMATS = {"channels_last": True, "contiguous": False, "contiguous_format": False}
SMALL_DATASET_MAX_STAGE = 2
SMALL_DET_BATCH_MAX = 64
SMALL_CLS_BATCH_MAX = 96
LARGE_HEADROOM_BELOW = 0.90
LARGE_HEADROOM = 0.92


def _override_value(overrides: Any, key: str) -> Optional[Any]:
    if overrides is None:
        return None
    if isinstance(overrides, dict):
        return overrides.get(key)
    return getattr(overrides, key, None)


def _small_dataset_optimizations(cfg: Any, changes: List[str]) -> None:
    """Stages 1-2: short runs, where compile time would dominate and huge batches buy nothing."""
    if cfg.train.detection.auto_batch_max > SMALL_DET_BATCH_MAX:
        cfg.train.detection.auto_batch_max = SMALL_DET_BATCH_MAX
        changes.append(f"train.detection.auto_batch_max: {SMALL_DET_BATCH_MAX} (small dataset)")
    if cfg.train.classification.auto_batch_max > SMALL_CLS_BATCH_MAX:
        cfg.train.classification.auto_batch_max = SMALL_CLS_BATCH_MAX
        changes.append(f"train.classification.auto_batch_max: {SMALL_CLS_BATCH_MAX} (small dataset)")
    if cfg.optimization.torch_compile == "max-autotune":
        cfg.optimization.torch_compile = "reduce-overhead"
        changes.append("optimization.torch_compile: reduce-overhead (small dataset: less compile overhead)")


def _large_dataset_optimizations(cfg: Any, changes: List[str]) -> None:
    """Stages 3-4: long runs, where max-autotune's compile time pays back."""
    # "none" is a deliberate choice (CPU runs, debugging): only an enabled compile is upgraded.
    if cfg.optimization.torch_compile == "reduce-overhead":
        cfg.optimization.torch_compile = "max-autotune"
        changes.append("optimization.torch_compile: max-autotune (large dataset)")
    if not cfg.optimization.channels_last:
        cfg.optimization.channels_last = True
        changes.append("optimization.channels_last: True (large dataset)")
    if cfg.train.auto_batch_vram_headroom < LARGE_HEADROOM_BELOW:
        cfg.train.auto_batch_vram_headroom = LARGE_HEADROOM
        changes.append(f"train.auto_batch_vram_headroom: {LARGE_HEADROOM} (large dataset)")


def _explicit_overrides(cfg: Any, stage: int, changes: List[str]) -> None:
    key = f"stage_{stage}"
    overrides = (cfg.train.stage_overrides or {}).get(key)
    batch = _override_value(overrides, "batch_size_override")
    if batch is not None:
        if int(batch) < 1:
            raise ConfigError(f"train.stage_overrides.{key}.batch_size_override={batch} must be >= 1")
        cfg.train.classification.batch_size = int(batch)
        changes.append(f"train.classification.batch_size: {batch} (stage override)")
    mode = _override_value(overrides, "compile_mode")
    if mode is not None:
        if mode not in COMPILE_MODES:
            raise ConfigError(f"train.stage_overrides.{key}.compile_mode={mode!r} is not one of {list(COMPILE_MODES)}")
        cfg.optimization.torch_compile = mode
        changes.append(f"optimization.torch_compile: {mode} (stage override)")
    memory_format = _override_value(overrides, "memory_format")
    if memory_format is not None:
        if memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"train.stage_overrides.{key}.memory_format={memory_format!r} is not one of "
                              f"{sorted(MEMORY_FORMATS)}")
        cfg.optimization.channels_last = MEMORY_FORMATS[memory_format]
        changes.append(f"optimization.channels_last: {MEMORY_FORMATS[memory_format]} (stage override)")
    workers = _override_value(overrides, "num_workers_override")
    if workers is not None:
        if int(workers) < 0:
            raise ConfigError(f"train.stage_overrides.{key}.num_workers_override={workers} must be >= 0")
        cfg.dataloader.num_workers = int(workers)
        changes.append(f"dataloader.num_workers: {workers} (stage override)")
    if overrides is None:
        logger.info("stage %d: no stage overrides configured", stage)


def apply_stage_overrides(cfg: Any, stage: int) -> Tuple[Any, List[str]]:
    """(modified deep copy of cfg, changes as "key: value (why)"); the input config is left untouched."""
    if stage < 1:
        raise ConfigError(f"stage must be >= 1, got {stage}")
    cfg = copy.deepcopy(cfg)
    changes: List[str] = []
    if stage <= SMALL_DATASET_MAX_STAGE:
        _small_dataset_optimizations(cfg, changes)
    else:
        _large_dataset_optimizations(cfg, changes)
    _explicit_overrides(cfg, stage, changes)
    logger.info("stage %d settings: %s", stage, "; ".join(changes) if changes else "no changes")
    return cfg, changes


def stage_config(cfg: Any, stage: int) -> Tuple[Any, List[str]]:
    """apply_stage_overrides, then one log line with the settings the stage will really run with."""
    cfg, changes = apply_stage_overrides(cfg, stage)
    tc, dl, opt = cfg.train, cfg.dataloader, cfg.optimization
    models = []
    for name, mc in (("classifier", tc.classification), ("detector", tc.detection)):
        auto = f"auto up to {mc.auto_batch_max}" if mc.auto_batch_tune else "fixed"
        models.append(f"{name} batch {mc.batch_size} ({auto}) x {mc.epochs} epochs")
    workers = f"autotune over {list(dl.autotune_candidates)}" if dl.autotune_workers else "fixed"
    logger.info("stage %d runs with: strategy %s, %s, accum %d, VRAM headroom %.2f, %d workers (%s), compile=%s, "
                "channels_last=%s, amp=%s/%s, classifier %dpx, detector %dpx (%s)", stage, tc.strategy,
                "; ".join(models), tc.grad_accum_steps, tc.auto_batch_vram_headroom, dl.num_workers, workers,
                opt.torch_compile, opt.channels_last, opt.amp, opt.amp_dtype, cfg.classification.image_size,
                cfg.detection.image_size, "on" if cfg.detection.enabled else "off")
    return cfg, changes
