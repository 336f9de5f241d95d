"""The ONE learning-rate schedule of both models: linear warmup, then cosine down to MIN_LR_FACTOR, no restarts.

(Restarts cost an earlier implementation of this design 15 points of validation accuracy.)

Its position is counted in "reference steps" (optimizer steps at the global batch the schedule was planned for).
While the global batch is unchanged one optimizer step advances it by 1, so it IS the per-step schedule. After an
OOM S3 changes the global batch from G_ref to G, each step advances it by G / G_ref: warmup and cosine end at the
same number of SAMPLES as planned. The position lives in the factor object, which LambdaLR saves in its
state_dict, so checkpoints and resumes keep it. The ultralytics-driven detector reads the same curve
(`lr_factor`) per epoch.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)
MIN_LR_FACTOR = 0.01  # the cosine ends at 1 % of the peak LR


def lr_factor(position: float, total: float, warmup: float, kind: str = "cosine",
              min_factor: float = MIN_LR_FACTOR) -> float:
    """The LR multiplier at `position` of `total` (any unit: steps, epochs), after `warmup` of them."""
    if position < warmup:
        return (position + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (position - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class SampleProgressFactor:
    """LR multiplier as a function of the scheduler's step count (LambdaLR's `last_epoch`)."""

    def __init__(self, total_steps: int, warmup_steps: int, kind: str = "cosine",
                 min_factor: float = MIN_LR_FACTOR, reference_global_batch: int = 1):
        total = max(1, total_steps)
        self.total = total
        self.warm = min(max(0, warmup_steps), total - 1) if total > 1 else 0
        self.kind, self.min_factor = kind, min_factor
        self.reference_global_batch = max(1, reference_global_batch)
        # position(step) = anchor_position + (step - anchor_step) * rate; rate = G / G_ref.
        self.anchor_step, self.anchor_position, self.rate = 0, 0.0, 1.0

    def position(self, step: int) -> float:
        return self.anchor_position + (step - self.anchor_step) * self.rate

    def __call__(self, step: int) -> float:
        return lr_factor(self.position(step), self.total, self.warm, self.kind, self.min_factor)

    def set_global_batch(self, step: int, global_batch: int) -> None:
        """From `step` on, every optimizer step moves the schedule by global_batch / G_ref reference steps."""
        self.anchor_position, self.anchor_step = self.position(step), step
        self.rate = global_batch / self.reference_global_batch


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str,
                reference_global_batch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over a SampleProgressFactor (one per param group, so state_dict keeps their positions)."""
    factors = [SampleProgressFactor(total_steps, warmup_steps, kind, reference_global_batch=reference_global_batch)
               for _ in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def switch_to_samples(scheduler: torch.optim.lr_scheduler.LambdaLR, global_batch: int) -> None:
    """Make `scheduler` advance by samples from its current step on (after an OOM global-batch change)."""
    step = scheduler.last_epoch
    for factor in scheduler.lr_lambdas:
        factor.set_global_batch(step, global_batch)
    log.info("LR schedule now advances by samples: %d per step = %.4f reference steps (G_ref=%d)",
             global_batch, scheduler.lr_lambdas[0].rate, scheduler.lr_lambdas[0].reference_global_batch)


def scale_optimizer_hparams(optimizer: torch.optim.Optimizer, scheduler=None, lr_scale: float = 1.0) -> None:
    """LR (current, initial and the scheduler's base) per group; used by S3 and batch plans. Weight decay is never
    rescaled: decoupled decay is lr*wd per step, so scaling lr already keeps the per-sample decay.

    Schedulers recompute lr from base_lrs every step; scaling only param_group["lr"] would be undone.
    """
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
        if "initial_lr" in group:
            group["initial_lr"] *= lr_scale
    if scheduler is not None:
        scheduler.base_lrs = [lr * lr_scale for lr in scheduler.base_lrs]
    log.info("optimizer rescaled: lr x%.4f", lr_scale)
