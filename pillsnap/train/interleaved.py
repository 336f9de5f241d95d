"""train.strategy=interleaved (D-1, D-5): ONE loop alternating d detector and c classifier micro-steps.

    for step in range(total_steps):
        detector step if step % (d + c) < d else classifier step

Each model keeps its own optimizer (AdamW) and schedule; both run under the same precision policy. A "round" (the
loop's epoch) is enough steps for each model to see its data once (the smaller set cycles); the loop runs until
each model has had at least its configured epochs, validates both at every round end, keeps best.pt per model and
stops early on detection mAP@0.5 (D-6). Both models' states go into ONE atomic checkpoint (last.pt per round,
recovery.pt every train.recovery_every_steps steps), so a resume continues at the same global step.

Files: <stage_dir>/detector/checkpoints/{last,recovery,best}.pt (our detector schema; last/recovery also carry the
classifier), <stage_dir>/checkpoints/{last,best}.pt (the classifier, in its usual place and schema).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd

from pillsnap.config import PillSnapConfig, to_dict
from pillsnap.data.yolo_dataset import build_yolo_dataset, detection_rows
from pillsnap.evaluate.reports import write_json_atomic
from pillsnap.models.detector import DETECTOR_CLASS_MAP_HASH, backbone_name, build_detector, detector_payload
from pillsnap.progress import progress
from pillsnap.train.checkpoints import (CheckpointMismatchError, check_compatible, find_resume_checkpoint,
                                        restore_rng_state, rng_state, save_checkpoint)
from pillsnap.train.detector import MONITOR, DetectorTrainResult, detector_dir
from pillsnap.train.detector_callbacks import EpochHook, StepHook, fmt
from pillsnap.train.interleaved_parts import ClassifierSide, DetectorSide
from pillsnap.train.policy import apply_global_settings, resolve_policy, set_seed
from pillsnap.train.tb import TBWriter

log = logging.getLogger(__name__)
DET_KEYS = ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall")
CLS_KEYS = ("accuracy", "macro_f1", "top5", "val_loss")


@dataclass
class LoopState:
    global_step: int = 0
    round: int = 0
    best_map: float = float("nan")
    best_round: int = -1
    bad_rounds: int = 0
    cls_best: Optional[float] = None
    cls_best_round: int = -1
    stopped_early: bool = False
    finished: bool = False
    det_sums: Dict[str, float] = field(default_factory=dict)
    det_count: int = 0
    cls_sum: float = 0.0
    cls_count: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


def train_interleaved(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Path, class_map,
                      step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                      show_progress: bool = True) -> DetectorTrainResult:
    return InterleavedLoop(cfg, subset, stage, stage_dir, class_map, step_hook, epoch_hook, show_progress).run()


class InterleavedLoop:
    def __init__(self, cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, stage_dir: Path, class_map,
                 step_hook: Optional[StepHook], epoch_hook: Optional[EpochHook], show_progress: bool):
        self.d, self.c = (int(x) for x in cfg.train.interleave_ratio)
        if self.d <= 0 or self.c <= 0:
            raise ValueError(f"train.interleave_ratio={[self.d, self.c]}: interleaved training needs steps for both "
                             "models; to train one model alone use train.strategy=sequential")
        self.cfg, self.stage_dir, self.out = cfg, Path(stage_dir), detector_dir(stage_dir)
        self.step_hook, self.epoch_hook, self.show_progress = step_hook, epoch_hook, show_progress
        self.backbone = backbone_name(cfg.detection)
        set_seed(cfg.train.seed, cfg.train.deterministic)
        policy = resolve_policy(cfg.optimization)
        apply_global_settings(policy, cfg.train.deterministic)
        log.info("interleaved policy (both models): %s", policy.describe())
        self.data = build_yolo_dataset(subset, cfg.exp_dir, stage, cfg.detection.include_single_images)
        rows = detection_rows(subset, cfg.detection.include_single_images)
        model = build_detector(cfg.detection, self.out / "model")
        self.det = DetectorSide(cfg, model, self.data, rows[rows["split"] == "val"], policy)
        k_codes = sorted(set(subset.loc[subset["kind"] == "single", "k_code"]))
        self.cls = ClassifierSide(cfg, subset, class_map.restrict(k_codes), self.stage_dir)
        self._plan()
        self.state = LoopState()
        self.tb = TBWriter(self.out / "tb", cfg.logging.tensorboard)

    def _plan(self) -> None:
        tc = self.cfg.train
        nb_d, nb_c = self.det.stream.steps_per_epoch, self.cls.stream.steps_per_epoch
        cycles_per_round = max(math.ceil(nb_d / self.d), math.ceil(nb_c / self.c))
        cycles_needed = max(math.ceil(tc.detection.epochs * nb_d / self.d),
                            math.ceil(tc.classification.epochs * nb_c / self.c))
        self.rounds = max(1, math.ceil(cycles_needed / cycles_per_round))
        self.steps_per_round = cycles_per_round * (self.d + self.c)
        self.total_steps = self.rounds * self.steps_per_round
        cycles = self.rounds * cycles_per_round
        self.det.plan(cycles * self.d)
        self.cls.plan(cycles * self.c)
        log.info("interleaved d:c=%d:%d: %d rounds x %d steps; detector %d batches/epoch -> %.1f epochs, "
                 "classifier %d batches/epoch -> %.1f epochs", self.d, self.c, self.rounds, self.steps_per_round,
                 nb_d, cycles * self.d / nb_d, nb_c, cycles * self.c / nb_c)

    # ------------------------------------------------------------------ loop
    def run(self) -> DetectorTrainResult:
        resumed = self._resume()
        try:
            self._train()
        finally:
            self.tb.close()
            self.cls.trainer.tb.close()
        return self._result(resumed)

    def _train(self) -> None:
        s, tc = self.state, self.cfg.train
        with progress(total=self.total_steps, desc="train detector+classifier", unit="step",
                      enabled=self.show_progress) as bar:
            bar.update(min(s.global_step, self.total_steps))
            while s.global_step < self.total_steps and not s.stopped_early:
                self._one_step()
                bar.update()
                if s.global_step % self.steps_per_round == 0:
                    self._end_round()
                elif tc.recovery_every_steps and s.global_step % tc.recovery_every_steps == 0:
                    save_checkpoint(self.out / "checkpoints" / "recovery.pt", self._payload())
        if not s.finished:
            s.finished = True
            save_checkpoint(self.out / "checkpoints" / "last.pt", self._payload(), keep_previous=True)

    def _one_step(self) -> None:
        s = self.state
        if s.global_step % (self.d + self.c) < self.d:
            items = self.det.step()
            loss, which = sum(items.values()), "detector"
            for k, v in items.items():
                s.det_sums[k] = s.det_sums.get(k, 0.0) + v
            s.det_count += 1
            self.tb.scalar("detector/train/loss", loss, s.global_step)
        else:
            loss, which = self.cls.step(), "classifier"
            s.cls_sum, s.cls_count = s.cls_sum + loss, s.cls_count + 1
            self.cls.trainer.tb.scalar("train/loss", loss, s.global_step)
        s.global_step += 1
        if self.step_hook is not None:
            self.step_hook(s.global_step, loss, which)

    def _end_round(self) -> None:
        s, es = self.state, self.cfg.train.early_stopping
        det_metrics, cls_metrics = self.det.validate(), self.cls.validate()
        s.round += 1
        record = self._record(det_metrics, cls_metrics)
        s.history.append(record)
        s.det_sums, s.det_count, s.cls_sum, s.cls_count = {}, 0, 0.0, 0
        self._report(record)
        value = record["val"]["mAP_0.5"]
        # ties count as improvement, as in ultralytics' stopper: a flat 0.0 early in training is not a plateau
        if math.isfinite(value) and (not math.isfinite(s.best_map) or value >= s.best_map + es.min_delta):
            s.best_map, s.best_round, s.bad_rounds = value, s.round, 0
            save_checkpoint(self.out / "checkpoints" / "best.pt", self._detector_only_payload(record))
        else:
            s.bad_rounds += 1
        self._classifier_checkpoints(record)
        if es.enabled and s.bad_rounds >= es.patience:
            s.stopped_early = True
            log.info("early stopping: detection mAP@0.5 did not improve for %d rounds (best %s at round %d)",
                     es.patience, fmt(s.best_map), s.best_round)
        if s.global_step >= self.total_steps or s.stopped_early:
            s.finished = True
        save_checkpoint(self.out / "checkpoints" / "last.pt", self._payload(), keep_previous=True)
        write_json_atomic(self.out / "reports" / "metrics.json", {"detection": {"latest": record,
                                                                                "history": s.history}})
        if self.epoch_hook is not None:
            self.epoch_hook(s.round, record)

    def _record(self, det_metrics: Dict[str, Any], cls_metrics: Dict[str, Any]) -> Dict[str, Any]:
        s = self.state
        val = {k: float(det_metrics.get(k, float("nan"))) for k in DET_KEYS}
        cls_val = {k: float("nan") if cls_metrics.get(k) is None else float(cls_metrics[k]) for k in CLS_KEYS}
        train = {k: v / max(1, s.det_count) for k, v in s.det_sums.items()}
        not_measured = [f"detection.{k}" for k, v in val.items() if not math.isfinite(v)]
        not_measured += [f"classification.{k}" for k, v in cls_val.items() if not math.isfinite(v)]
        return {"epoch": s.round, "global_step": s.global_step, "train": train, "val": val,
                "classifier": {"train_loss": s.cls_sum / max(1, s.cls_count), "val": cls_val},
                "epochs_seen": {"detector": round(self.det.stream.epochs_seen, 3),
                                "classifier": round(self.cls.stream.epochs_seen, 3)},
                "not_measured": not_measured}

    def _report(self, r: Dict[str, Any]) -> None:
        t, v, cv = r["train"], r["val"], r["classifier"]["val"]
        log.info("[det] e=%d/%d box_loss=%s cls_loss=%s dfl_loss=%s mAP50=%s mAP50-95=%s P=%s R=%s "
                 "(epochs seen: detector %.1f, classifier %.1f)", r["epoch"], self.rounds,
                 fmt(t.get("box_loss")), fmt(t.get("cls_loss")), fmt(t.get("dfl_loss")), fmt(v["mAP_0.5"]),
                 fmt(v["mAP_0.5_0.95"]), fmt(v["precision"]), fmt(v["recall"]), r["epochs_seen"]["detector"],
                 r["epochs_seen"]["classifier"])
        log.info("[cls] e=%d/%d loss=%s val_loss=%s acc=%s macro_f1=%s", r["epoch"], self.rounds,
                 fmt(r["classifier"]["train_loss"]), fmt(cv["val_loss"]), fmt(cv["accuracy"]), fmt(cv["macro_f1"]))
        if r["not_measured"]:
            log.warning("round %d not measured: %s", r["epoch"], ", ".join(r["not_measured"]))
        step = r["global_step"]
        for key, value in {**{f"train/{k}": x for k, x in t.items()}, **{f"val/{k}": x for k, x in v.items()}}.items():
            self.tb.scalar(f"detector/{key}", value if math.isfinite(value) else None, step)
        for key, value in cv.items():
            self.cls.trainer.tb.scalar(f"val/{key}", value if math.isfinite(value) else None, step)
        self.tb.flush()

    # ------------------------------------------------------------------ checkpoints
    def _detector_only_payload(self, record: Dict[str, Any]) -> Dict[str, Any]:
        s = self.state
        return detector_payload(self.det.model, self.backbone, self.cfg.detection.image_size, strategy="interleaved",
                                epoch=s.round, global_step=s.global_step, best_metric=s.best_map, monitor=MONITOR,
                                val_metrics_json=json.dumps(record["val"]), config=json.dumps(to_dict(self.cfg)))

    def _payload(self) -> Dict[str, Any]:
        s = self.state
        return detector_payload(
            self.det.model, self.backbone, self.cfg.detection.image_size, strategy="interleaved", epoch=s.round,
            global_step=s.global_step, best_metric=s.best_map, monitor=MONITOR, total_steps=self.total_steps,
            detector_state=self.det.state_dict(), classifier=self.cls.state_dict(),
            loop_state=json.dumps(asdict(s)), rng=rng_state(), config=json.dumps(to_dict(self.cfg)))

    def _classifier_checkpoints(self, record: Dict[str, Any]) -> None:
        s, es = self.state, self.cfg.train.early_stopping
        value = record["classifier"]["val"].get(es.monitor)
        sign = 1 if es.mode == "max" else -1
        if value is not None and math.isfinite(value) and (s.cls_best is None or sign * (value - s.cls_best) > 0):
            s.cls_best, s.cls_best_round = value, s.round
            payload = self.cls.checkpoint_payload(s.round, s.cls_best, s.cls_best_round, self._cls_history())
            save_checkpoint(self.stage_dir / "checkpoints" / "best.pt", payload)
        payload = self.cls.checkpoint_payload(s.round, s.cls_best, s.cls_best_round, self._cls_history())
        save_checkpoint(self.stage_dir / "checkpoints" / "last.pt", payload, keep_previous=True)
        latest = self._cls_history()[-1]
        write_json_atomic(self.stage_dir / "reports" / "metrics.json",
                          {"classification": {"latest": latest, "history": self._cls_history()}})

    def _cls_history(self) -> List[Dict[str, Any]]:
        return [{"epoch": h["epoch"], "global_step": h["global_step"], "train_loss": h["classifier"]["train_loss"],
                 "val": h["classifier"]["val"], "val_ema": None} for h in self.state.history]

    def _resume(self) -> Optional[int]:
        if self.cfg.train.resume != "last":
            return None
        found = find_resume_checkpoint(self.out / "checkpoints")
        if found is None:
            return None
        path, p = found
        if p.get("strategy") != "interleaved":
            raise CheckpointMismatchError(f"{path} was written by train.strategy={p.get('strategy')!r}, this run is "
                                          "interleaved: move it away or set train.resume=none")
        check_compatible(p, self.backbone, 1, DETECTOR_CLASS_MAP_HASH, path)
        labels = self.cls.trainer.labels
        check_compatible(p["classifier"], self.cfg.classification.backbone, len(labels), labels.hash,
                         f"{path} (classifier part)")
        if p.get("total_steps") != self.total_steps:
            log.warning("%s planned %s steps, this configuration plans %d", path, p.get("total_steps"),
                        self.total_steps)
        self.det.model.load_state_dict(p["model"])
        self.det.load_state_dict(p["detector_state"])
        self.cls.load_state_dict(p["classifier"])
        self.state = LoopState(**json.loads(p["loop_state"]))
        restore_rng_state(p["rng"])
        # augmentations also draw from python's and numpy's generators: reseed them from the resume point
        random.seed(self.cfg.train.seed * 1_000_003 + self.state.global_step)
        np.random.seed((self.cfg.train.seed * 1_000_003 + self.state.global_step) % 2**32)
        log.info("interleaved: resumed at global step %d of %d (round %d)", self.state.global_step,
                 self.total_steps, self.state.round)
        return self.state.global_step

    def _result(self, resumed: Optional[int]) -> DetectorTrainResult:
        s = self.state
        best = next((h for h in s.history if h["epoch"] == s.best_round), None)
        cls_best = next((h for h in s.history if h["epoch"] == s.cls_best_round), None)
        latest = s.history[-1] if s.history else None
        classifier = {
            "best_checkpoint": str(self.stage_dir / "checkpoints" / "best.pt"),
            "last_checkpoint": str(self.stage_dir / "checkpoints" / "last.pt"),
            "monitor": self.cfg.train.early_stopping.monitor, "best_metric": s.cls_best,
            "best_epoch": s.cls_best_round, "val_metrics": cls_best["classifier"]["val"] if cls_best else {},
            "class_map_hash": self.cls.trainer.labels.hash, "tensorboard": str(self.stage_dir / "tb")}
        return DetectorTrainResult(
            strategy="interleaved", backbone=self.backbone,
            best_checkpoint=str(self.out / "checkpoints" / "best.pt"),
            last_checkpoint=str(self.out / "checkpoints" / "last.pt"), best_metric=float(s.best_map),
            best_epoch=s.best_round, epochs_completed=s.round, epochs_planned=self.rounds,
            global_step=s.global_step, resumed=resumed is not None, stopped_early=s.stopped_early,
            val_metrics=dict(best["val"]) if best else {}, history=s.history, data=asdict(self.data),
            tensorboard=str(self.out / "tb"),
            not_measured=[] if best and math.isfinite(s.best_map) else [MONITOR],
            extra={"classifier": classifier, "ratio": [self.d, self.c], "rounds": self.rounds,
                   "steps_per_round": self.steps_per_round, "total_steps": self.total_steps,
                   "epochs_seen": latest["epochs_seen"] if latest else {"detector": 0.0, "classifier": 0.0}})
