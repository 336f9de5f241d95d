"""Ultralytics trainer callbacks -> our log, TensorBoard, progress listeners, state file and checkpoints.

Per epoch ultralytics runs: on_train_epoch_end -> validation -> on_model_save -> on_fit_epoch_end. The epoch is
closed at the first of the last two (metrics are final, its last.pt is on disk), and a final extra
on_fit_epoch_end (ultralytics' best.pt re-validation) is recognised by "no new training epoch" and ignored.
Every metric is a float; one that was not measured is NaN and listed in the record's `not_measured`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.evaluate.reports import write_json_atomic
from pillsnap.models.detector import detector_payload
from pillsnap.progress import progress
from pillsnap.train.checkpoints import save_checkpoint
from pillsnap.train.tb import TBWriter

log = logging.getLogger(__name__)
StepHook = Callable[[int, float, str], None]  # (global step, loss, "detector" | "classifier") after every batch
EpochHook = Callable[[int, Dict[str, Any]], None]  # (epoch, its record) after every validated epoch
VAL_KEYS = {"metrics/mAP50(B)": "mAP_0.5", "metrics/mAP50-95(B)": "mAP_0.5_0.95",
            "metrics/precision(B)": "precision", "metrics/recall(B)": "recall"}
TRAIN_LOSSES = ("box_loss", "cls_loss", "dfl_loss")


def nan_safe_greater(a: Optional[float], b: Optional[float], min_delta: float = 0.0) -> bool:
    """a improves on b: a is a real number and b is missing/NaN or smaller by more than min_delta."""
    if a is None or not math.isfinite(a):
        return False
    return b is None or not math.isfinite(b) or a - b > min_delta


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


class EpochForwarder:
    def __init__(self, cfg: PillSnapConfig, trainer, state: Dict[str, Any], state_path: Path, out: Path,
                 backbone: str, step_hook: Optional[StepHook], epoch_hook: Optional[EpochHook], show_progress: bool):
        self.cfg, self.trainer, self.state, self.state_path, self.out = cfg, trainer, state, state_path, out
        self.backbone, self.step_hook, self.epoch_hook = backbone, step_hook, epoch_hook
        self.show_progress = show_progress
        self.tb = TBWriter(out / "tb", cfg.logging.tensorboard)
        self._fresh_epoch = False
        self._pending: Optional[Dict[str, Any]] = None
        self._bar = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        for event, fn in (("on_train_batch_end", self._on_batch_end), ("on_train_epoch_end", self._on_epoch_end),
                          ("on_model_save", self._on_model_save), ("on_fit_epoch_end", self._on_fit_epoch_end)):
            self.trainer.add_callback(event, fn)
        epochs = self.cfg.train.detection.epochs
        with progress(total=epochs, desc="train detector", unit="epoch", enabled=self.show_progress) as bar:
            self._bar = bar
            bar.update(len(self.state["history"]))
            try:
                yield
            finally:
                self.tb.close()

    # ----------------------------------------------------------------- events
    def _on_batch_end(self, trainer) -> None:
        self.state["global_step"] += 1
        loss = float(sum(float(v) for v in trainer.loss_items.values()))
        self.tb.scalar("detector/train/loss", loss, self.state["global_step"])
        if self.step_hook is not None:
            self.step_hook(self.state["global_step"], loss, "detector")

    def _on_epoch_end(self, trainer) -> None:
        self._fresh_epoch = True

    def _on_model_save(self, trainer) -> None:
        record = self._close_epoch(trainer)
        if record is not None:
            self._write_checkpoints(trainer, record)

    def _on_fit_epoch_end(self, trainer) -> None:
        self._close_epoch(trainer)
        record, self._pending = self._pending, None
        if record is None:
            return
        self._report(record)
        if self.epoch_hook is not None:
            self.epoch_hook(record["epoch"], record)

    # ----------------------------------------------------------------- helpers
    def _close_epoch(self, trainer) -> Optional[Dict[str, Any]]:
        if not self._fresh_epoch:
            return None
        self._fresh_epoch = False
        record = self._record(trainer)
        expected = len(self.state["history"]) + 1
        if record["epoch"] != expected:
            log.warning("detector: ultralytics reports epoch %d, our history expected %d", record["epoch"], expected)
        self.state["history"].append(record)
        write_json_atomic(self.state_path, self.state)
        write_json_atomic(self.out / "reports" / "metrics.json",
                          {"detection": {"latest": record, "history": self.state["history"]}})
        self._pending = record
        return record

    def _record(self, trainer) -> Dict[str, Any]:
        metrics = trainer.metrics or {}
        val = {ours: _num(metrics.get(theirs)) for theirs, ours in VAL_KEYS.items()}
        val.update({k.split("/", 1)[1]: _num(v) for k, v in metrics.items() if k.startswith("val/")})
        losses = trainer.tloss or {}
        train = {k: _num(losses.get(k)) for k in TRAIN_LOSSES}
        lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer else float("nan")
        not_measured = [k for k, v in {**val, **train}.items() if not math.isfinite(v)]
        return {"epoch": trainer.epoch + 1, "global_step": self.state["global_step"], "train": train, "val": val,
                "lr": float(lr), "not_measured": not_measured}

    def _report(self, record: Dict[str, Any]) -> None:
        e, total = record["epoch"], self.cfg.train.detection.epochs
        t, v = record["train"], record["val"]
        log.info("[det] e=%d/%d box_loss=%s cls_loss=%s dfl_loss=%s mAP50=%s mAP50-95=%s P=%s R=%s", e, total,
                 fmt(t["box_loss"]), fmt(t["cls_loss"]), fmt(t["dfl_loss"]), fmt(v["mAP_0.5"]),
                 fmt(v["mAP_0.5_0.95"]), fmt(v["precision"]), fmt(v["recall"]))
        if record["not_measured"]:
            log.warning("[det] e=%d not measured: %s", e, ", ".join(record["not_measured"]))
        step = record["global_step"]
        for key, value in t.items():
            self.tb.scalar(f"detector/train/{key}", value if math.isfinite(value) else None, step)
        for key, value in v.items():
            self.tb.scalar(f"detector/val/{key}", value if math.isfinite(value) else None, step)
        self.tb.scalar("detector/train/lr", record["lr"], step)
        self.tb.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"mAP50={fmt(v['mAP_0.5'])}")

    def _write_checkpoints(self, trainer, record: Dict[str, Any]) -> None:
        history: List[Dict[str, Any]] = self.state["history"]
        best = max((h["val"]["mAP_0.5"] for h in history if math.isfinite(h["val"]["mAP_0.5"])), default=None)
        payload = detector_payload(
            trainer.ema.ema, self.backbone, self.cfg.detection.image_size, strategy="sequential",
            epoch=record["epoch"], global_step=record["global_step"], best_metric=best, monitor="mAP_0.5",
            val_metrics_json=json.dumps(record["val"]), history_json=json.dumps(history),
            run_dir=str(trainer.save_dir), ultralytics_checkpoint=str(trainer.last),
            config=json.dumps(to_dict(self.cfg)))
        ckpt_dir = self.out / "checkpoints"
        save_checkpoint(ckpt_dir / "last.pt", payload, keep_previous=True)
        if trainer.best_fitness is not None and trainer.fitness == trainer.best_fitness:
            save_checkpoint(ckpt_dir / "best.pt", payload)
