"""The classifier loop's counters (checkpointed) and its result (returned to the orchestrator as a dict)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    monitor: str
    best_metric: Optional[float]
    best_epoch: int
    epochs_completed: int
    global_step: int
    resumed_from_step: Optional[int]
    stopped_early: bool
    val_metrics: Dict
    history: List[Dict] = field(default_factory=list)
    mean_throughput: float = 0.0
    skipped_samples: int = 0
    class_map_hash: str = ""
    policy: str = ""
    batch_size: int = 0  # what ran at the end: OOM recovery or auto batch may differ from the config
    grad_accum: int = 1
    oom_events: List[Dict] = field(default_factory=list)  # one audit dict per OOM decision (D-8)
    auto_batch: Optional[Dict] = None  # the auto-batch plan applied (D-4), None when not tuned
    num_workers: Optional[Dict] = None  # the worker-autotune plan applied (Annex 2), None when not tuned
    warnings: List[Dict] = field(default_factory=list)  # loss spikes, plateau advice, memory warnings


@dataclass
class ClassifierState:
    """Everything the loop counts; saved in every checkpoint so a resume continues at the exact sample."""

    epoch: int = 0
    samples_in_epoch: int = 0  # sampler positions consumed in this epoch (unreadable samples included)
    global_step: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = -1
    bad_epochs: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: List[Dict] = field(default_factory=list)
    epoch_positions: int = 0  # sampler positions one epoch consumes (fixed at the start: OOM S3 keeps epochs)
    steps_in_epoch: int = 0
    reference_global_batch: int = 0  # the global batch that progress and the LR schedule are counted in

    def to_payload(self) -> Dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "history"}
        out["history_json"] = json.dumps(self.history)
        return out

    @classmethod
    def from_payload(cls, payload: Dict[str, Any]) -> "ClassifierState":
        known = {f.name for f in fields(cls)} - {"history"}
        values = {k: payload[k] for k in known if k in payload}  # older checkpoints lack the newer counters
        return cls(history=json.loads(payload["history_json"]), **values)
