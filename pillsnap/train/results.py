"""What training returns to the orchestrator for each model: small, serialisable, the same shape for both."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from pillsnap.core.jsonio import to_jsonable


@dataclass
class TrainResult:
    model: str  # classifier | detector
    strategy: str  # sequential | interleaved
    backbone: str
    best_checkpoint: str
    last_checkpoint: str
    monitor: str
    best_metric: Optional[float]  # None (JSON) / NaN when never measured (see not_measured)
    best_epoch: int
    epochs_completed: int
    epochs_planned: int
    global_step: int  # this model's optimizer steps
    resumed_from_step: Optional[int]
    stopped_early: bool
    val_metrics: Dict[str, Any]  # the best epoch's validation metrics
    history: List[Dict[str, Any]] = field(default_factory=list)
    epochs: List[Dict[str, Any]] = field(default_factory=list)  # per epoch: loss, monitor, throughput, memory
    mean_throughput: float = 0.0  # img/s over every trained epoch (samples / busy time), a resume included
    skipped_samples: int = 0
    class_map_hash: str = ""
    policy: str = ""
    batch_size: int = 0  # what ran at the end: OOM recovery or a batch plan may differ from the config
    grad_accum: int = 1
    oom_events: List[Dict[str, Any]] = field(default_factory=list)  # one audit dict per OOM decision (D-8)
    auto_batch: Optional[Dict[str, Any]] = None  # the batch plan applied (D-4), None when none was given
    num_workers: Optional[Dict[str, Any]] = None  # the worker plan applied (Annex 2)
    warnings: List[Dict[str, Any]] = field(default_factory=list)  # loss spikes, plateaus, memory warnings
    tensorboard: str = ""
    compile: str = "eager"  # eager | compiled | fell_back
    not_measured: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)  # what it trained and validated on

    def as_dict(self, with_history: bool = False) -> Dict[str, Any]:
        out = asdict(self)
        if not with_history:
            out.pop("history")
        return to_jsonable(out)  # NaN -> null for JSON; the names are in not_measured


def epoch_rows(history: List[Dict[str, Any]], monitor: str) -> List[Dict[str, Any]]:
    """One small row per epoch for the stage checks: training loss, the monitored metric, the epoch's resources."""
    rows = []
    for h in history:
        rows.append({"epoch": h["epoch"], "train_loss": float(h["train_loss"]),
                     "monitor": (h.get("val") or {}).get(monitor),
                     **(h.get("resources") or {})})
    return rows


def mean_throughput(history: List[Dict[str, Any]]) -> float:
    """Images per second over every epoch of the history: its samples over the time its steps took."""
    samples = seconds = 0.0
    for h in history:
        r = h.get("resources") or {}
        if r.get("throughput_img_s"):
            samples += r["samples"]
            seconds += r["samples"] / r["throughput_img_s"]
    return samples / seconds if seconds else 0.0
