"""Loss spike, plateau and non-finite loss monitors."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from pillsnap.train.services.loss_monitors import LossSpikeMonitor, NonFiniteLossError, PlateauMonitor, check_finite_loss


def test_loss_spike_warns_above_1_5x_running_average(caplog):
    monitor = LossSpikeMonitor(factor=1.5, ema_decay=0.9, warmup_steps=5)
    events = [monitor.update(step, 1.0) for step in range(10)]
    assert events == [None] * 10 and monitor.ema == pytest.approx(1.0)
    assert monitor.update(10, 1.4) is None  # below 1.5x
    with caplog.at_level(logging.WARNING, logger="pillsnap.train.services.loss_monitors"):
        spike = monitor.update(11, 3.0)
    assert spike is not None and spike.step == 11 and spike.ratio > 1.5
    assert "loss spike at step 11" in caplog.text


def test_no_spike_during_warmup_and_nan_ignored():
    monitor = LossSpikeMonitor(warmup_steps=3)
    assert monitor.update(0, 1.0) is None and monitor.update(1, 10.0) is None
    ema = monitor.ema
    assert monitor.update(2, float("nan")) is None and monitor.ema == ema


def test_loss_spike_accepts_tensors():
    monitor = LossSpikeMonitor(warmup_steps=1)
    monitor.update(0, torch.tensor(1.0))
    monitor.update(1, torch.tensor(1.0))
    assert monitor.update(2, torch.tensor(5.0)) is not None


def test_plateau_advises_lower_lr_after_patience_and_once_per_plateau():
    monitor = PlateauMonitor(patience=3, mode="max", lr_factor=0.5, metric_name="macro_f1")
    assert monitor.update(0, 0.5) is None and monitor.update(1, 0.6) is None
    advice = [monitor.update(epoch, 0.55) for epoch in range(2, 8)]
    assert [a is not None for a in advice] == [False, False, True, False, False, True]
    first = advice[2]
    assert first.epochs_without_improvement == 3 and first.best == 0.6 and first.best_epoch == 1
    assert first.lr_factor == 0.5 and "lower the learning rate" in first.message
    assert monitor.update(8, 0.7) is None and monitor.epochs_without_improvement == 0


def test_plateau_min_mode_and_min_delta():
    monitor = PlateauMonitor(patience=1, mode="min", min_delta=0.1)
    monitor.update(0, 1.0)
    assert monitor.update(1, 0.95) is not None  # improvement smaller than min_delta
    assert monitor.update(2, 0.8) is None


def test_plateau_before_any_finite_value_gives_no_advice_and_no_error():
    monitor = PlateauMonitor(patience=1, mode="max")
    assert monitor.update(0, float("nan")) is None and monitor.update(1, float("nan")) is None
    assert monitor.update(2, 0.4) is None and monitor.update(3, 0.3) is not None  # a real plateau still advises


def test_non_finite_loss_raises_with_step_and_batch_info():
    assert check_finite_loss(torch.tensor(0.5), step=1) == 0.5
    with pytest.raises(NonFiniteLossError) as info:
        check_finite_loss(torch.tensor(float("inf")), step=42, batch_info={"paths": ["a.png"]})
    assert info.value.step == 42 and info.value.batch_info == {"paths": ["a.png"]}
    assert "step 42" in str(info.value) and "a.png" in str(info.value)
    with pytest.raises(NonFiniteLossError):
        check_finite_loss(math.nan, step=3)
