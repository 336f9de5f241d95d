"""Training health of one model: loss spikes, plateaus and GPU memory, kept for the result.

The monitors only warn and advise; the warnings go to the log, to TensorBoard and into TrainResult.warnings
(the advisor reads them). The list is capped so a long noisy run cannot bloat the result or the checkpoints.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from pillsnap.config import PillSnapConfig
from pillsnap.train.services.gpu_memory import MemoryMonitor
from pillsnap.train.services.loss_monitors import LossSpikeMonitor, PlateauMonitor
from pillsnap.train.services.telemetry import TBWriter

log = logging.getLogger(__name__)
MAX_KEPT_WARNINGS = 50


class TrainingHealth:
    def __init__(self, cfg: PillSnapConfig, tb: TBWriter, monitor: str, mode: str,
                 memory: Optional[MemoryMonitor] = None):
        es = cfg.train.early_stopping
        self.tb = tb
        self.spikes = LossSpikeMonitor()
        # Advise halfway to early stopping: the advice is only useful while training still runs.
        self.plateau = PlateauMonitor(patience=max(2, es.patience // 2), mode=mode, min_delta=es.min_delta,
                                      metric_name=monitor)
        self.memory = memory or MemoryMonitor()
        self.warnings: List[Dict[str, Any]] = []
        self.dropped = 0

    def _keep(self, warning: Dict[str, Any]) -> None:
        if len(self.warnings) < MAX_KEPT_WARNINGS:
            self.warnings.append(warning)
        else:
            self.dropped += 1

    def on_step(self, step: int, loss: float) -> None:
        spike = self.spikes.update(step, loss)
        if spike is not None:
            self._keep({"kind": "loss_spike", **asdict(spike)})
            self.tb.scalar("health/loss_spike_ratio", spike.ratio, step)

    def on_epoch_start(self, epoch: int, step: int, batch_size: int) -> None:
        report = self.memory.check(epoch)
        if report is None:
            return
        # D-8: memory use next to the batch size, so their relation shows in TensorBoard.
        self.tb.scalar("memory/fraction", report["fraction"], step)
        self.tb.scalar("memory/batch_size", batch_size, step)
        if report["warning"]:
            self.tb.scalar("oom/memory_warning", report["fraction"], step)
            self._keep({"kind": "memory", "epoch": epoch, "fraction": report["fraction"], "batch_size": batch_size})

    def on_epoch_end(self, epoch: int, value: Optional[float]) -> None:
        if value is None:
            return
        advice = self.plateau.update(epoch, value)
        if advice is not None:
            self._keep({"kind": "plateau", **asdict(advice)})

    def summary(self) -> List[Dict[str, Any]]:
        if not self.dropped:
            return list(self.warnings)
        return [*self.warnings, {"kind": "truncated", "more_warnings": self.dropped}]

    def state_dict(self) -> Dict[str, Any]:
        p = self.plateau
        return {"warnings": self.warnings, "dropped": self.dropped,
                "spike": {"ema": self.spikes.ema, "seen": self.spikes.seen},
                "plateau": {"best": p.best, "best_epoch": p.best_epoch,
                            "epochs_without_improvement": p.epochs_without_improvement}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.warnings, self.dropped = list(state["warnings"]), int(state["dropped"])
        self.spikes.ema, self.spikes.seen = state["spike"]["ema"], state["spike"]["seen"]
        for key, value in state["plateau"].items():
            setattr(self.plateau, key, value)

    def close(self) -> None:
        self.memory.close()
