"""What an orchestration task calls before training: stage settings (D-13), auto batch (D-4), workers (Annex 2).

    cfg, changes = stage_config(cfg, stage)                        # a modified copy + "key: value (why)" list
    batch = tune_batch(cfg, subset, class_map)                     # {"batch_size", "grad_accum", ...}
    workers = tune_workers(cfg, subset, class_map, batch["batch_size"])
    train_classifier(cfg, subset, class_map, out, batch_plan=batch, worker_plan=workers)

The plans are small JSON dicts, valid for one machine + model + image size (the orchestrator's cache key).
On a machine without CUDA tune_batch returns the configured batch with the reason, without probing.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.train.classifier_data import build_classifier_data, stage_label_space
from pillsnap.train.oom import FaultInjector
from pillsnap.train.stage_overrides import apply_stage_overrides
from pillsnap.train.tuning_probes import batch_plan_from_search, worker_plan_from_measurement

log = logging.getLogger(__name__)
DISABLED_REASON = "train.classification.auto_batch_tune=false: keeping configured batch"


def stage_config(cfg: PillSnapConfig, stage: int) -> Tuple[PillSnapConfig, List[str]]:
    """apply_stage_overrides, then one log line with the settings the stage will really run with."""
    cfg, changes = apply_stage_overrides(cfg, stage)
    tc, dl, opt = cfg.train, cfg.dataloader, cfg.optimization
    auto = f"auto up to {tc.classification.auto_batch_max}" if tc.classification.auto_batch_tune else "fixed"
    workers = f"autotune over {list(dl.autotune_candidates)}" if dl.autotune_workers else "fixed"
    log.info("stage %d runs with: classifier batch %d (%s, VRAM headroom %.2f) x accum %d, %d workers (%s), "
             "compile=%s, channels_last=%s, amp=%s/%s, image %dpx", stage, tc.classification.batch_size, auto,
             tc.auto_batch_vram_headroom, tc.grad_accum_steps, dl.num_workers, workers, opt.torch_compile,
             opt.channels_last, opt.amp, opt.amp_dtype, cfg.classification.image_size)
    return cfg, changes


def tune_batch(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap,
               show_progress: bool = False) -> Dict[str, Any]:
    """The auto-batch plan for this config's model and image size, probed with real training steps on CUDA.

    With auto_batch_tune off the plan is the configured batch (nothing is built or probed).

    Builds the classifier and its data like a training run (the preprocessing cache is shared with it), but
    trains nothing: every probe restores weights and optimizer state.
    """
    from pillsnap.train.loop import ClassifierTrainer  # the trainer imports this package's probes

    tc = cfg.train
    if not tc.classification.auto_batch_tune:
        bs, accum = tc.classification.batch_size, max(1, tc.grad_accum_steps)
        log.info("auto batch: train.classification.auto_batch_tune=false, keeping batch %d x accum %d", bs, accum)
        return {"batch_size": bs, "grad_accum": accum, "global_batch": bs * accum, "target_global_batch": bs * accum,
                "lr_scale": 1.0, "amp_dtype": None, "eval_batch_size": bs, "memory_fraction": None, "probes": [],
                "reasons": [DISABLED_REASON], "device": None, "probed": False}
    cfg = copy.deepcopy(cfg)
    cfg.logging.tensorboard = False  # the training run records the plan it applies
    with tempfile.TemporaryDirectory(prefix="pillsnap-tune-batch-") as tmp:
        trainer = ClassifierTrainer(cfg, subset, stage_label_space(subset, class_map), Path(tmp),
                                    show_progress=show_progress, fault_injector=FaultInjector())
        try:
            return batch_plan_from_search(trainer)
        finally:
            trainer.tb.close()
            trainer.health.close()


def tune_workers(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, batch_size: Optional[int] = None,
                 show_progress: bool = False) -> Dict[str, Any]:
    """The worker plan: data_time of the real training loader at each candidate worker count (no model)."""
    data = build_classifier_data(cfg, subset, stage_label_space(subset, class_map), show_progress)
    return worker_plan_from_measurement(cfg, data, batch_size or cfg.train.classification.batch_size)
