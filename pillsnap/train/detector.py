"""Detector training: the entry point, and the `sequential` strategy on ultralytics' own trainer.

Sequential: ultralytics' DetectionTrainer is called ONCE for all epochs (the earlier implementation called
train(epochs=1) per outer epoch and never progressed). Callbacks forward every epoch to our log
(`[det] e=3/50 box_loss=… mAP50=…`), TensorBoard and progress listeners, and convert the weights into OUR
checkpoint schema (<stage_dir>/detector/checkpoints/{last,best}.pt) as they are saved. Every fresh run gets its own
folder (runs/run001, run002, …) so nothing is overwritten; a resume continues the unfinished run with
ultralytics' `resume=True` on its last.pt: the remaining epochs, appended to the same results.csv.
`detector/sequential_state.json` records the run, its history and whether it completed, so a retried task returns
a finished result instead of training again. best.pt and early stopping follow mAP@0.5 (D-6).

The `interleaved` strategy lives in `pillsnap.train.interleaved`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.data.yolo_dataset import YoloDataset, build_yolo_dataset
from pillsnap.evaluate.reports import read_json, to_jsonable, write_json_atomic
from pillsnap.models.detector import backbone_name, prepare_ultralytics, write_model_yaml
from pillsnap.train.detector_callbacks import EpochForwarder, EpochHook, StepHook, nan_safe_greater
from pillsnap.train.policy import resolve_policy

log = logging.getLogger(__name__)
MONITOR = "mAP_0.5"


@dataclass
class DetectorTrainResult:
    """What a training task returns: small and serialisable (paths, numbers, per-epoch history)."""
    strategy: str
    backbone: str
    best_checkpoint: str
    last_checkpoint: str
    best_metric: float  # mAP@0.5 of best.pt; NaN when never measured (see not_measured)
    best_epoch: int
    epochs_completed: int
    epochs_planned: int
    global_step: int
    resumed: bool
    stopped_early: bool
    val_metrics: Dict[str, Any]
    history: List[Dict[str, Any]] = field(default_factory=list)
    monitor: str = MONITOR
    run_dir: str = ""
    data: Dict[str, Any] = field(default_factory=dict)
    tensorboard: str = ""
    not_measured: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)  # interleaved: classifier summary, epochs seen

    def as_dict(self, with_history: bool = False) -> Dict[str, Any]:
        out = asdict(self)
        if not with_history:
            out.pop("history")
        return to_jsonable(out)  # NaN -> null for JSON; the names are in not_measured


def detector_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / "detector"


def train_detector(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Optional[Path] = None,
                   class_map=None, step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                   show_progress: bool = True) -> DetectorTrainResult:
    """Train the detector of one stage with train.strategy; interleaved also trains the classifier (class_map)."""
    if not cfg.detection.enabled:
        raise ValueError("detection.enabled=false: there is no detector to train (train the classifier alone)")
    stage_dir = Path(stage_dir or cfg.exp_dir / f"stage_{stage}")
    prepare_ultralytics(cfg.exp_dir / "ultralytics_settings")
    if cfg.train.strategy == "interleaved":
        if class_map is None:
            raise ValueError("train.strategy=interleaved trains the classifier too: pass the global class map")
        from pillsnap.train.interleaved import train_interleaved

        return train_interleaved(cfg, subset, stage, stage_dir, class_map, step_hook, epoch_hook, show_progress)
    return train_detector_sequential(cfg, subset, stage, stage_dir, step_hook, epoch_hook, show_progress)


# ------------------------------------------------------------------------------------------------ sequential
def train_detector_sequential(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Path,
                              step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                              show_progress: bool = True) -> DetectorTrainResult:
    out = detector_dir(stage_dir)
    data = build_yolo_dataset(subset, cfg.exp_dir, stage, cfg.detection.include_single_images)
    model_yaml = write_model_yaml(cfg.detection, out / "model")
    signature = _signature(cfg, data)
    state_path = out / "sequential_state.json"
    state = _load_state(state_path, signature, cfg.train.resume)
    resume_from = _resumable_last(state, cfg.train.detection.epochs)
    if state.get("completed"):
        log.info("detector: %s already completed (%s); returning its result", state["run_dir"], state_path)
        write_json_atomic(state_path, state)
        return _result(cfg, state, data, out)
    overrides = _overrides(cfg, data, model_yaml, out / "runs")
    if resume_from is not None:
        overrides["resume"] = str(resume_from)
        log.info("detector: resuming %s at epoch %d of %d", resume_from, len(state["history"]) + 1,
                 cfg.train.detection.epochs)
    else:
        overrides["name"] = _next_run_name(out / "runs")
        state = {"signature": signature, "run_dir": str(out / "runs" / overrides["name"]), "completed": False,
                 "history": [], "global_step": 0, "resumed": False}
    state["resumed"] = resume_from is not None or state.get("resumed", False)
    trainer = _make_trainer(cfg, overrides, data)
    forwarder = EpochForwarder(cfg, trainer, state, state_path, out, backbone_name(cfg.detection), step_hook,
                               epoch_hook, show_progress)
    with forwarder.attached(), _no_amp_download_check(overrides["amp"] is True):
        trainer.train()
    state["completed"] = True
    state["stopped_early"] = len(state["history"]) < cfg.train.detection.epochs
    write_json_atomic(state_path, state)
    return _result(cfg, state, data, out)


def _make_trainer(cfg: PillSnapConfig, overrides: Dict[str, Any], data: YoloDataset):
    from pillsnap.train.detector_trainer import PillDetectionTrainer

    return PillDetectionTrainer(overrides, data.ultralytics_data(), cfg.detection.activation,
                                cfg.detection.pretrained_path)


def _overrides(cfg: PillSnapConfig, data: YoloDataset, model_yaml: Path, runs: Path) -> Dict[str, Any]:
    """The resolved config, translated into ultralytics' arguments (and nothing else decides them)."""
    tc, det = cfg.train, cfg.detection
    policy = resolve_policy(cfg.optimization)
    batch = tc.detection.batch_size
    accum = max(1, tc.grad_accum_steps)
    batches_per_epoch = max(1, math.ceil(data.images["train"] / batch))
    patience = tc.early_stopping.patience if tc.early_stopping.enabled else tc.detection.epochs + 1
    amp: Any = False
    if policy.amp_dtype is not None:
        amp = "bf16" if "bfloat16" in str(policy.amp_dtype) else True
    return {
        "task": "detect", "mode": "train", "model": str(model_yaml), "data": data.data_yaml,
        "epochs": tc.detection.epochs, "batch": batch, "imgsz": det.image_size, "nbs": batch * accum,
        "optimizer": "AdamW", "lr0": tc.detection.lr, "lrf": 0.01, "weight_decay": tc.weight_decay,
        "cos_lr": tc.scheduler == "cosine", "warmup_epochs": tc.warmup_steps / batches_per_epoch,
        "warmup_bias_lr": 0.0, "patience": patience, "seed": tc.seed, "deterministic": tc.deterministic,
        "device": "cpu" if policy.device.type == "cpu" else str(policy.device.index or 0), "amp": amp,
        "workers": cfg.dataloader.num_workers, "channels_last": policy.channels_last,
        "compile": policy.compile_mode if policy.compile_mode != "none" else False,
        "project": str(runs), "exist_ok": False, "plots": False, "val": True, "save": True, "verbose": False,
        "pretrained": False, "max_det": det.max_det,
    }


def _signature(cfg: PillSnapConfig, data: YoloDataset) -> str:
    """What a resumable run must share with this call: detector config, its training config, the data."""
    import hashlib

    parts = {"detection": to_dict(cfg)["detection"], "train": to_dict(cfg)["train"]["detection"],
             "data": data.content_hash}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _load_state(path: Path, signature: str, resume: str) -> Dict[str, Any]:
    if resume != "last" or not path.is_file():
        return {}
    state = read_json(path)
    if state.get("signature") != signature:
        log.info("detector: %s belongs to another configuration or data set; starting a new run", path)
        return {}
    for record in state.get("history", []):  # JSON keeps "not measured" as null; comparisons want NaN
        for part in ("train", "val"):
            record[part] = {k: float("nan") if v is None else v for k, v in record[part].items()}
    return state


def _resumable_last(state: Dict[str, Any], epochs: int) -> Optional[Path]:
    """The unfinished run's last.pt, when it holds at least one finished epoch and epochs remain."""
    if not state or state.get("completed"):
        return None
    last = Path(state["run_dir"]) / "weights" / "last.pt"
    done = len(state.get("history", []))
    if last.is_file() and 0 < done < epochs:
        return last
    if done >= epochs:  # trained to the end, stopped before it was marked complete: nothing left to train
        state["completed"] = True
    return None


def _next_run_name(runs: Path) -> str:
    taken = {p.name for p in runs.glob("run*")} if runs.is_dir() else set()
    k = 1
    while f"run{k:03d}" in taken:
        k += 1
    return f"run{k:03d}"


@contextlib.contextmanager
def _no_amp_download_check(fp16: bool) -> Iterator[None]:
    """Ultralytics checks fp16 AMP by downloading yolo26n.pt; nothing downloads here, so the check is skipped
    (bf16 and fp32 never run it)."""
    if not fp16:
        yield
        return
    import ultralytics.engine.trainer as engine

    original = engine.check_amp
    engine.check_amp = lambda model: True
    log.info("detector: AMP fp16 without ultralytics' download-based AMP check")
    try:
        yield
    finally:
        engine.check_amp = original


def _result(cfg: PillSnapConfig, state: Dict[str, Any], data: YoloDataset, out: Path) -> DetectorTrainResult:
    history = state.get("history", [])
    best = None
    for record in history:  # the LAST epoch reaching the best value: the one ultralytics kept as best.pt
        if best is None or not nan_safe_greater(best["val"].get(MONITOR), record["val"].get(MONITOR)):
            best = record
    best_val = dict(best["val"]) if best else {}
    best_metric = float(best_val.get(MONITOR, float("nan")))
    not_measured = sorted(k for k, v in best_val.items() if not math.isfinite(v)) if best else [MONITOR]
    return DetectorTrainResult(
        strategy="sequential", backbone=backbone_name(cfg.detection),
        best_checkpoint=str(out / "checkpoints" / "best.pt"), last_checkpoint=str(out / "checkpoints" / "last.pt"),
        best_metric=best_metric, best_epoch=best["epoch"] if best else -1, epochs_completed=len(history),
        epochs_planned=cfg.train.detection.epochs, global_step=int(state.get("global_step", 0)),
        resumed=bool(state.get("resumed")), stopped_early=bool(state.get("stopped_early")), val_metrics=best_val,
        history=history, run_dir=state.get("run_dir", ""), data=asdict(data), tensorboard=str(out / "tb"),
        not_measured=not_measured)
