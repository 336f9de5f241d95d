"""What training returns to the orchestrator for each model: small, serialisable, the same shape for both."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from pillsnap.core.identity import ArtifactChanged, file_sha256, short
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
    # What the result is bound to: best.pt's content, the training fingerprint (config, batch plans, data) and the
    # data identity in it (subset row hash, detector share, warm start sha256), and the number of processes.
    best_sha256: Optional[str] = None
    fingerprint: str = ""
    data_identity: Dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

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


def check_trained_on(results: Mapping[str, Mapping[str, Any]], subset_hash: str) -> Dict[str, Dict[str, Any]]:
    """The results of a run given the subset `subset_hash`, which every model must have trained on (a rank of a
    distributed run reads the subset again): ArtifactChanged names both hashes otherwise."""
    for name, result in results.items():
        trained_on = (result.get("data_identity") or {}).get("subset")
        if trained_on != subset_hash:
            raise ArtifactChanged(f"the {name} trained on subset {trained_on}, this run's subset is {subset_hash}: "
                                  "another run rebuilt the stage's subset meanwhile; run the stage again")
    return {name: dict(result) for name, result in results.items()}


def checkpoints_changed(results: Mapping[str, Mapping[str, Any]]) -> Optional[str]:
    """Why the best.pt files a (cached) training result describes are not on disk as it recorded them, or None."""
    for name, result in results.items():
        path, recorded = Path(result["best_checkpoint"]), result.get("best_sha256")
        if not path.is_file():
            return f"the {name}'s {path} is gone"
        actual = file_sha256(path)
        if actual != recorded:
            return (f"the {name}'s {path} is not the model this result describes (sha256 {short(actual)} on disk, "
                    f"{short(recorded)} recorded)")
    return None
