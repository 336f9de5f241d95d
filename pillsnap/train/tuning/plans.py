"""What the orchestrator computes before training, per model: auto batch (D-4 / Annex 1) and worker autotune
(Annex 2). Plans are small JSON dicts, valid for one machine + model + image size (the orchestrator's cache key):

    batch = tune_batch(cfg, subset, class_map, "detector", stage)        # {"batch_size", "grad_accum", ...}
    workers = tune_workers(cfg, subset, class_map, "detector", stage, batch["batch_size"])

On CUDA the probes measure the allocator's peak against the VRAM headroom. On a CPU they run the same real steps and
measure the process's resident memory against the headroom of the host memory this process can use; the configured
batch is then the ceiling (a CPU gains no speed from a larger batch), so the probes confirm it fits or halve it.
`probes` replaces the real probes (tests drive the search with them).
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
import psutil
import torch

from pillsnap.config import PillSnapConfig, config_fingerprint
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import Collate
from pillsnap.train.data import UnitData
from pillsnap.train.loops.streams import steps_per_epoch
from pillsnap.train.services.oom_state_machine import FaultInjector
from pillsnap.train.services.policy import resolve_policy
from pillsnap.train.tuning.autobatch import (HOST_REASON, AutoBatchResult, ProbeFn, auto_find_batch_size,
                                             find_eval_batch_size)
from pillsnap.train.tuning.probes import eval_probe, repeat_batches, training_probe
from pillsnap.train.tuning.workers import autotune_num_workers, available_cores

log = logging.getLogger(__name__)
MODELS = ("classifier", "detector")
MIN_TRAIN_BATCH = 2  # batch norm (both models) cannot train on a batch of one sample
EVAL_MAX_FACTOR = 4  # Annex 1: search up to 4x; evaluation keeps no gradients, so it usually fits more
WORKER_WARMUP_STEPS, WORKER_MEASURE_STEPS = 30, 100


# What a batch or worker plan depends on (with the machine it was measured on): the cache key of the tuning tasks.
TUNING_KEYS = {
    "classifier": ("classification.backbone", "classification.image_size", "classification.crop_padding",
                   "train.classification.batch_size", "train.classification.auto_batch_max",
                   "train.classification.auto_batch_tune"),
    "detector": ("detection.scale", "detection.activation", "detection.image_size", "train.detection.batch_size",
                 "train.detection.auto_batch_max", "train.detection.auto_batch_tune"),
}
SHARED_TUNING_KEYS = ("optimization.amp", "optimization.amp_dtype", "optimization.channels_last",
                      "train.grad_accum_steps", "train.auto_batch_vram_headroom", "train.oom.max_grad_accum",
                      "train.oom.min_batch", "train.oom.escalate_to_fp16", "train.ema", "train.detection.ema",
                      "dataloader.num_workers", "dataloader.autotune_workers", "dataloader.autotune_candidates")


def tuning_fingerprint(config: Mapping[str, Any], model: str, *extra: Any) -> str:
    """The plan's config keys (config as a dict) and `extra` (the machine, the batch a worker plan runs at)."""
    return config_fingerprint(config, (*TUNING_KEYS[model], *SHARED_TUNING_KEYS), *extra)


def _model_cfg(cfg: PillSnapConfig, model: str):
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not one of {list(MODELS)}")
    return getattr(cfg.train, "classification" if model == "classifier" else "detection")


def fixed_plan(batch_size: int, accum: int, reason: str, device: Optional[str]) -> Dict[str, Any]:
    return {"batch_size": batch_size, "grad_accum": accum, "global_batch": batch_size * accum,
            "target_global_batch": batch_size * accum, "lr_scale": 1.0, "amp_dtype": None,
            "eval_batch_size": batch_size, "memory_fraction": None, "probes": [], "reasons": [reason],
            "device": device, "probed": False}


def batch_plan_dict(found: AutoBatchResult, found_eval: AutoBatchResult, device: str) -> Dict[str, Any]:
    return {
        "batch_size": found.batch_size, "grad_accum": found.grad_accum, "global_batch": found.global_batch,
        "target_global_batch": found.target_global_batch, "lr_scale": found.lr_scale, "amp_dtype": found.amp_dtype,
        "eval_batch_size": found_eval.batch_size, "memory_fraction": found.memory_fraction,
        "probes": [[bs, peak] for bs, peak in found.probes], "reasons": list(found.reasons), "device": device,
        "probed": True,
    }


def tune_batch(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, model: str = "classifier",
               stage: int = 1, probes: Optional[Tuple[ProbeFn, ProbeFn]] = None,
               device_total_bytes: Optional[int] = None) -> Dict[str, Any]:
    """The largest batch of `model` that trains within the VRAM headroom, probed with real steps on CUDA."""
    mc, tc = _model_cfg(cfg, model), cfg.train
    accum = max(1, tc.grad_accum_steps)
    if not mc.auto_batch_tune:
        log.info("%s auto batch: train.%s.auto_batch_tune=false, keeping batch %d x accum %d", model,
                 "classification" if model == "classifier" else "detection", mc.batch_size, accum)
        key = "classification" if model == "classifier" else "detection"
        return fixed_plan(mc.batch_size, accum, f"train.{key}.auto_batch_tune=false: keeping configured batch", None)
    policy = resolve_policy(cfg.optimization)
    if probes is not None:
        return _search(cfg, mc, policy, probes, 0, "test probes", device_total_bytes)
    host = policy.device.type != "cuda"
    with tempfile.TemporaryDirectory(prefix="pillsnap-tune-batch-") as tmp:
        unit, items, collate, val_size = _probe_unit(cfg, subset, class_map, model, stage, Path(tmp))
        make_batch = repeat_batches(items, collate)
        probes = (training_probe(unit, make_batch), eval_probe(unit, make_batch))
        if host:  # what this process may hold: its own resident memory plus what the host has free
            total = device_total_bytes or psutil.Process().memory_info().rss + psutil.virtual_memory().available
            return _search(cfg, mc, policy, probes, val_size, "cpu (host memory)", total, ceiling=mc.batch_size)
        return _search(cfg, mc, policy, probes, val_size, torch.cuda.get_device_name(policy.device),
                       device_total_bytes)


def _search(cfg: PillSnapConfig, mc, policy, probes: Tuple[ProbeFn, ProbeFn], val_size: int, device: str,
            device_total_bytes: Optional[int], ceiling: Optional[int] = None) -> Dict[str, Any]:
    """`ceiling` (a CPU: the configured batch) replaces auto_batch_max as the largest training batch searched."""
    tc, accum = cfg.train, max(1, cfg.train.grad_accum_steps)
    amp = "fp16" if policy.amp_dtype == torch.float16 else "bf16" if policy.amp_dtype == torch.bfloat16 else "fp32"
    max_bs = ceiling or mc.auto_batch_max
    found = auto_find_batch_size(
        probes[0], mc.batch_size, max_bs, tc.auto_batch_vram_headroom, device_total_bytes,
        grad_accum=accum, max_grad_accum=tc.oom.max_grad_accum, min_bs=max(tc.oom.min_batch, MIN_TRAIN_BATCH),
        amp_dtype=amp,
        allow_fp16=tc.oom.escalate_to_fp16, cuda_available=True)
    eval_max = max(found.batch_size, EVAL_MAX_FACTOR * max_bs)
    if val_size:
        eval_max = max(found.batch_size, min(eval_max, val_size))
    if ceiling:  # the ceiling holds for evaluation too: the probe confirms the training batch fits there
        found.reasons.append(HOST_REASON)
        eval_max = found.batch_size
    found_eval = find_eval_batch_size(probes[1], found.batch_size, eval_max, tc.auto_batch_vram_headroom,
                                      device_total_bytes, cuda_available=True)
    return batch_plan_dict(found, found_eval, device)


def _probe_unit(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, model: str, stage: int, tmp: Path):
    """The real unit (eager, no TensorBoard) and a few real training samples to repeat into probe batches."""
    from pillsnap.train.loops.members import classifier_member, detector_member

    cfg = copy.deepcopy(cfg)
    cfg.logging.tensorboard = False  # the training run records the plan it applies
    policy = resolve_policy(cfg.optimization)
    quiet = {model: FaultInjector()}
    if model == "classifier":
        member = classifier_member(cfg, subset, class_map, tmp, policy, show_progress=False, injectors=quiet)
        ds = member.data.dataset
        items = [it for it in (ds[(i, i)] for i in range(min(len(ds), 64))) if it is not None]
        return member.unit, items, Collate(), len(member.unit.val_loader.dataset)
    member = detector_member(cfg, subset, stage, tmp, policy, injectors=quiet)
    ds = member.data.dataset
    return member.unit, [ds[i] for i in range(min(len(ds), 64))], ds.collate_fn, len(member.unit.val_samples)


# --------------------------------------------------------------------------- DataLoader workers
def worker_candidates(configured: Sequence[int], cores: int) -> List[int]:
    """The configured candidates; on a machine with fewer cores than two of them, also cores/2 and cores.

    workers.clip_candidates drops what exceeds the cores (and logs it); without the additions a small machine
    would "choose" among a single candidate.
    """
    usable = [c for c in configured if 0 <= c <= cores]
    if len(set(usable)) >= 2:
        return sorted(set(configured))
    return sorted(set(configured) | {max(1, cores // 2), cores})


def unit_data(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, model: str, stage: int) -> UnitData:
    from pillsnap.train.data import classifier_data, detector_data, stage_label_space
    from pillsnap.train.units.detector import detector_hyperparameters

    device = resolve_policy(cfg.optimization).device
    if model == "classifier":
        return classifier_data(cfg, subset, stage_label_space(subset, class_map), device, show_progress=False).train
    return detector_data(cfg, subset, stage, detector_hyperparameters(cfg), cfg.train.detection.epochs).train


def tune_workers(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, model: str = "classifier",
                 stage: int = 1, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Time `model`'s real training loader (pixel store included) at each candidate worker count; fastest wins."""
    mc = _model_cfg(cfg, model)
    if not cfg.dataloader.autotune_workers:
        return {"num_workers": cfg.dataloader.num_workers, "reason": "dataloader.autotune_workers=false"}
    data = unit_data(cfg, subset, class_map, model, stage)
    batch_size = batch_size or mc.batch_size
    cores = available_cores()
    candidates = worker_candidates(cfg.dataloader.autotune_candidates, cores)
    batches = steps_per_epoch(len(data.dataset), batch_size, 1, data.drop_last, None)
    # Short stage subsets have fewer batches than Annex 2's 30 + 100: keep a quarter for worker start-up.
    warmup = min(WORKER_WARMUP_STEPS, max(1, batches // 4))
    measure = max(1, min(WORKER_MEASURE_STEPS, batches - warmup))
    choice = autotune_num_workers(lambda workers: data.build_loader(batch_size, workers), candidates, warmup, measure,
                                  cpu_count=cores)
    return {"model": model, "num_workers": choice.num_workers, "candidates": candidates,
            "data_time_ms": {str(k): round(1000 * v, 3) for k, v in choice.data_time_s.items()},
            "measured_steps": {str(k): v for k, v in choice.measured_steps.items()},
            "skipped": list(choice.skipped), "cpu_count": cores, "batch_size": batch_size, "reason": choice.reason}

