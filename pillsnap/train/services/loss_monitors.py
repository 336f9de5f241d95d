"""Training health monitors (v3 lessons, "real-time monitoring"): loss spikes, plateaus, non-finite loss.

Each monitor is fed by the loop and returns an event (or None); the loop decides what to log or write to
TensorBoard. Nothing here stops training except NonFiniteLossError.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from pillsnap.train.services.checkpoint_policy import improved

logger = logging.getLogger(__name__)

LossValue = Union[float, torch.Tensor]


def _as_float(loss: LossValue) -> float:
    return float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; continuing would only write NaN weights into the checkpoints."""

    def __init__(self, step: int, batch_info: Any = None, value: float = float("nan")):
        self.step, self.batch_info, self.value = step, batch_info, value
        where = f" (batch: {batch_info})" if batch_info is not None else ""
        super().__init__(f"non-finite loss {value} at step {step}{where}: lower the LR, check the inputs of "
                         "this batch, or use bf16/fp32 instead of fp16")


def check_finite_loss(loss: LossValue, step: int, batch_info: Any = None) -> float:
    """Return the loss as a float; raise NonFiniteLossError if it is NaN or inf.

    For a tensor this synchronises with the device, so call it at the logging interval, not every micro-step.
    """
    value = _as_float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(step, batch_info, value)
    return value


@dataclass
class LossSpike:
    step: int
    loss: float
    ema: float
    ratio: float


class LossSpikeMonitor:
    """Warn when the loss exceeds `factor` x an exponential moving average of recent losses."""

    def __init__(self, factor: float = 1.5, ema_decay: float = 0.9, warmup_steps: int = 10):
        if factor <= 1.0 or not 0.0 < ema_decay < 1.0:
            raise ValueError(f"LossSpikeMonitor: need factor > 1 and 0 < ema_decay < 1 (got {factor}, {ema_decay})")
        self.factor, self.ema_decay, self.warmup_steps = factor, ema_decay, warmup_steps
        self.ema: Optional[float] = None
        self.seen = 0

    def update(self, step: int, loss: LossValue) -> Optional[LossSpike]:
        value = _as_float(loss)
        if not math.isfinite(value):
            return None  # check_finite_loss reports those; a NaN must not poison the average
        spike = None
        # The first steps of training move fast: an EMA of a handful of values is no baseline yet.
        if self.ema is not None and self.seen >= self.warmup_steps and value > self.factor * self.ema:
            spike = LossSpike(step, value, self.ema, value / self.ema)
            logger.warning("loss spike at step %d: %.4f is %.2fx its running average %.4f",
                           step, value, spike.ratio, self.ema)
        self.ema = value if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * value
        self.seen += 1
        return spike


@dataclass
class PlateauAdvice:
    epoch: int
    epochs_without_improvement: int
    best: float
    best_epoch: int
    lr_factor: float
    message: str


class PlateauMonitor:
    """After `patience` epochs without improvement, advise lowering the LR (once per plateau)."""

    def __init__(self, patience: int = 5, mode: str = "max", min_delta: float = 0.0, lr_factor: float = 0.5,
                 metric_name: str = "metric"):
        if mode not in ("max", "min") or patience < 1 or not 0.0 < lr_factor < 1.0:
            raise ValueError(f"PlateauMonitor: need mode max|min, patience >= 1, 0 < lr_factor < 1 "
                             f"(got {mode}, {patience}, {lr_factor})")
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.lr_factor, self.metric_name = lr_factor, metric_name
        self.best: Optional[float] = None
        self.best_epoch = -1
        self.epochs_without_improvement = 0

    def update(self, epoch: int, value: float) -> Optional[PlateauAdvice]:
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.epochs_without_improvement = value, epoch, 0
            return None
        self.epochs_without_improvement += 1
        # Advise at patience, 2x patience, ...: repeating it every epoch would drown the log. Before any finite
        # value (a metric not measured yet) there is no plateau to speak of.
        if self.epochs_without_improvement % self.patience or self.best is None:
            return None
        # Lower, never restart: a cosine-with-restarts LR jump cost 15 points of val accuracy in an earlier
        # implementation of this design.
        message = (f"{self.metric_name} has not improved for {self.epochs_without_improvement} epochs "
                   f"(best {self.best:.4f} at epoch {self.best_epoch}): lower the learning rate by "
                   f"x{self.lr_factor} (do not restart the schedule)")
        logger.warning("plateau: %s", message)
        return PlateauAdvice(epoch, self.epochs_without_improvement, float(self.best), self.best_epoch,
                             self.lr_factor, message)
