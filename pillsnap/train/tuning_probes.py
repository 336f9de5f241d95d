"""Auto batch (D-4 / Annex 1) and worker autotune (Annex 2) measured on the trainer's REAL model and data.

Both return small JSON-serialisable "plans" (dicts) that the trainer applies, and that an orchestration task
can compute once per machine + model + image size and hand to later runs (see tuning.py).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pillsnap.config import PillSnapConfig
from pillsnap.data.datasets import EpochSampler, make_loader
from pillsnap.train.autobatch import (AutoBatchResult, ProbeFn, auto_find_batch_size, find_eval_batch_size,
                                      make_eval_probe, make_training_probe)
from pillsnap.train.classifier_data import ClassifierData
from pillsnap.train.workers import autotune_num_workers, available_cores

log = logging.getLogger(__name__)
EVAL_MAX_FACTOR = 4  # Annex 1: search up to 4x; evaluation keeps no gradients, so it usually fits more
WORKER_WARMUP_STEPS, WORKER_MEASURE_STEPS = 30, 100


# --------------------------------------------------------------------------- batch size
def _real_batch_maker(trainer: Any, limit: int) -> Callable[[int], Tuple[torch.Tensor, torch.Tensor]]:
    """Batches of real training images (augmented, fixed seeds) on the device, repeated up to any size."""
    ds, items = trainer.train_ds, []
    for i in range(min(len(ds), max(1, limit))):
        item = ds[(i, i)]
        if item is not None:
            items.append(item)
    if not items:
        raise RuntimeError("auto batch: no readable training image to probe with")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    dev, channels_last = trainer.policy.device, trainer.policy.channels_last

    def make_batch(batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(batch_size) % len(images)
        x = images[idx].to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels[idx].to(dev, non_blocking=True)

    return make_batch


def _no_probe(batch_size: int, amp_dtype: str) -> int:
    raise RuntimeError("auto batch: probing needs CUDA")  # never called: the search returns early without it


def batch_plan_from_search(trainer: Any, probes: Optional[Tuple[ProbeFn, ProbeFn]] = None,
                           device_total_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Probe real training steps for the largest batch within the VRAM headroom; CPU keeps the configured batch.

    `probes` = (training probe, eval probe) replaces the real ones (tests drive the search on a CPU with them).
    """
    tc = trainer.cfg.train
    cuda = trainer.policy.device.type == "cuda" or probes is not None
    max_bs = tc.classification.auto_batch_max
    train_probe, eval_probe = probes or (_no_probe, _no_probe)
    if cuda and probes is None:
        make_batch = _real_batch_maker(trainer, EVAL_MAX_FACTOR * max_bs)
        trainer.model.train()
        # The eager model: a compiled one would recompile for every probed size (minutes with max-autotune);
        # the VRAM headroom (D-4: 0.88) is what absorbs compile's own memory.
        train_probe = make_training_probe(trainer.model, trainer.optimizer, trainer.criterion, make_batch,
                                          trainer.ema, trainer.policy.device)
        eval_probe = make_eval_probe(trainer.model, make_batch, trainer.policy.device)
    found = auto_find_batch_size(
        train_probe, trainer.batch_size, max_bs, tc.auto_batch_vram_headroom, device_total_bytes,
        grad_accum=trainer.accum, max_grad_accum=tc.oom.max_grad_accum, min_bs=tc.oom.min_batch,
        amp_dtype=trainer.oom.state.amp_dtype, allow_fp16=tc.oom.escalate_to_fp16, cuda_available=cuda)
    found_eval = found  # without CUDA nothing is probed: evaluation keeps the training batch (and no second line)
    if cuda:
        eval_max = max(found.batch_size, min(EVAL_MAX_FACTOR * max_bs, len(trainer.val_ds)))
        found_eval = find_eval_batch_size(eval_probe, found.batch_size, eval_max, tc.auto_batch_vram_headroom,
                                          device_total_bytes, cuda_available=True)
    device = "cpu" if not cuda else "test probes" if probes else torch.cuda.get_device_name(trainer.policy.device)
    return batch_plan_dict(found, found_eval, device, probed=cuda)


def batch_plan_dict(found: AutoBatchResult, found_eval: AutoBatchResult, device: str, probed: bool) -> Dict[str, Any]:
    return {
        "batch_size": found.batch_size, "grad_accum": found.grad_accum, "global_batch": found.global_batch,
        "target_global_batch": found.target_global_batch, "lr_scale": found.lr_scale, "amp_dtype": found.amp_dtype,
        "eval_batch_size": found_eval.batch_size, "memory_fraction": found.memory_fraction,
        "probes": [[bs, peak] for bs, peak in found.probes], "reasons": list(found.reasons), "device": device,
        "probed": probed,
    }


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


def worker_plan_from_measurement(cfg: PillSnapConfig, data: ClassifierData, batch_size: int) -> Dict[str, Any]:
    """Time the real training loader (cache included) at each candidate worker count; fastest wins."""
    cores = available_cores()
    candidates = worker_candidates(cfg.dataloader.autotune_candidates, cores)
    ds, own = data.train_ds, data.sampler
    sampler = EpochSampler(own.n, own.seed, own.weights)  # tuning must not move the trainer's own sampler
    batches = len(ds) // batch_size if cfg.dataloader.drop_last and len(ds) >= batch_size else \
        math.ceil(len(ds) / batch_size)
    # Short stage subsets have fewer batches than Annex 2's 30 + 100: keep a quarter for worker start-up.
    warmup = min(WORKER_WARMUP_STEPS, max(1, batches // 4))
    measure = max(1, min(WORKER_MEASURE_STEPS, batches - warmup))

    def build(workers: int):
        return make_loader(ds, batch_size, cfg.dataloader, True, sampler, num_workers=workers)

    choice = autotune_num_workers(build, candidates, warmup, measure, cpu_count=cores)
    return {"num_workers": choice.num_workers, "candidates": candidates,
            "data_time_ms": {str(k): round(1000 * v, 3) for k, v in choice.data_time_s.items()},
            "measured_steps": {str(k): v for k, v in choice.measured_steps.items()},
            "skipped": list(choice.skipped), "cpu_count": cores, "batch_size": batch_size, "reason": choice.reason}
