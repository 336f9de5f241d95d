"""D-6 early stopping of one model: stop after `patience` validations without an improvement of `min_delta`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from pillsnap.config import EarlyStoppingConfig
from pillsnap.train.services.checkpoint_policy import improved


@dataclass
class EarlyStopping:
    monitor: str
    mode: str  # max | min
    patience: int
    min_delta: float
    enabled: bool = True
    best: Optional[float] = None
    bad_epochs: int = 0
    stopped: bool = False

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig, monitor: str, mode: str) -> "EarlyStopping":
        return cls(monitor, mode, cfg.patience, cfg.min_delta, cfg.enabled)

    def update(self, value: Optional[float]) -> bool:
        """After a validation: True when training should stop now."""
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = float(value), 0
        else:
            self.bad_epochs += 1
        self.stopped = self.enabled and self.bad_epochs >= self.patience
        return self.stopped

    def describe(self) -> str:
        best = "n/a" if self.best is None else f"{self.best:.4f}"
        return (f"{self.monitor} did not improve by {self.min_delta} for {self.patience} epochs (best {best})")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "stopped": self.stopped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best, self.bad_epochs, self.stopped = state["best"], int(state["bad_epochs"]), bool(state["stopped"])
