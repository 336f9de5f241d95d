"""The classifier's LR schedule, measured in samples so that an OOM global-batch change (D-8 S3) keeps it.

Linear warmup then cosine without restarts, exactly the curve of schedule.warmup_cosine, but its position is
counted in "reference steps" (optimizer steps at the global batch the schedule was planned for). While the
global batch is unchanged one optimizer step advances the position by 1, so it IS the per-step schedule. After
S3 changes the global batch from G_ref to G, each step advances it by G / G_ref: the warmup and the cosine end
at the same number of SAMPLES as planned. The position lives in the factor object, which LambdaLR saves in
its state_dict, so checkpoints and resumes keep it.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


class SampleProgressFactor:
    """LR multiplier as a function of the scheduler's step count (LambdaLR's `last_epoch`)."""

    def __init__(self, total_steps: int, warmup_steps: int, kind: str = "cosine", min_factor: float = 0.01,
                 reference_global_batch: int = 1):
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
        pos = self.position(step)
        if pos < self.warm:
            return (pos + 1) / (self.warm + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (pos - self.warm) / max(1, self.total - self.warm))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def set_global_batch(self, step: int, global_batch: int) -> None:
        """From `step` on, every optimizer step moves the schedule by global_batch / G_ref reference steps."""
        self.anchor_position, self.anchor_step = self.position(step), step
        self.rate = global_batch / self.reference_global_batch


def sample_based_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str,
                        reference_global_batch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over a SampleProgressFactor (one per param group, so state_dict keeps their positions)."""
    factors = [SampleProgressFactor(total_steps, warmup_steps, kind, reference_global_batch=reference_global_batch)
               for _ in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def switch_to_samples(scheduler: object, global_batch: int) -> bool:
    """Make `scheduler` advance by samples from its current step on; False when it cannot (not ours)."""
    factors = getattr(scheduler, "lr_lambdas", [])
    if not factors or not all(isinstance(f, SampleProgressFactor) for f in factors):
        log.warning("LR schedule %s is not sample-based: it keeps counting optimizer steps after the global batch "
                    "change", type(scheduler).__name__)
        return False
    step = scheduler.last_epoch  # type: ignore[attr-defined]
    for factor in factors:
        factor.set_global_batch(step, global_batch)
    log.info("LR schedule now advances by samples: %d per step = %.4f reference steps (G_ref=%d)",
             global_batch, factors[0].rate, factors[0].reference_global_batch)
    return True
