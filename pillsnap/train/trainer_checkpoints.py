"""Checkpoints of the classifier trainer (Annex 8): what they hold, and resuming from them exactly.

Besides weights, optimizer, schedule, scaler, EMA and RNG, a checkpoint holds the knobs the run had reached:
the loader batch and accumulation, the OOM state (micro-batch, precision, retries) and its audit, the applied
tuning plans and the health warnings. A resume continues with those, not with the config's starting values.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from pillsnap.train.checkpoints import (check_compatible, find_resume_checkpoint, restore_rng_state, rng_state,
                                        save_checkpoint)
from pillsnap.train.oom import OomState
from pillsnap.train.steps import amp_name
from pillsnap.train.train_state import ClassifierState

log = logging.getLogger(__name__)


class CheckpointMixin:
    """The checkpoint half of ClassifierTrainer."""

    def _payload(self) -> Dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None, **self.state.to_payload(),
            "config": self._config_json, "backbone": self.cfg.classification.backbone,
            "num_classes": len(self.labels), "class_map_hash": self.labels.hash, "k_codes": self.labels.k_codes,
            "image_size": self.cfg.classification.image_size, "batch_size": self.batch_size,
            "grad_accum": self.accum, "eval_batch_size": self.eval_batch_size, "num_workers": self.num_workers,
            "oom_state": asdict(self.oom.state), "oom_events_json": json.dumps(self.oom_events),
            "health_json": json.dumps(self.health.state_dict()),
            "plans_json": json.dumps({"batch": self.applied_batch_plan, "workers": self.applied_worker_plan}),
            "rng": rng_state(),
        }

    def _save(self, name: str) -> Path:
        return save_checkpoint(self.ckpt_dir / name, self._payload(), keep_previous=(name == "last.pt"))

    def _resume(self) -> Optional[int]:
        if self.cfg.train.resume != "last":
            return None
        found = find_resume_checkpoint(self.ckpt_dir)
        if found is None:
            log.info("train.resume=last: no checkpoint in %s, starting fresh", self.ckpt_dir)
            return None
        path, p = found
        check_compatible(p, self.cfg.classification.backbone, len(self.labels), self.labels.hash, path)
        self._restore_run_knobs(p)
        self.load_training_states(p)
        self.state = ClassifierState.from_payload(p)
        restore_rng_state(p["rng"])
        return self.state.global_step

    def load_training_states(self, p: Dict) -> None:
        """Model, optimizer, scheduler, scaler and EMA from a payload (shared with the interleaved loop)."""
        self.model.load_state_dict(p["model"])
        self.optimizer.load_state_dict(p["optimizer"])
        self.scheduler.load_state_dict(p["scheduler"])
        self.scaler.load_state_dict(p["scaler"])
        if self.ema is not None and p.get("ema") is not None:
            self.ema.module.load_state_dict(p["ema"])

    def _restore_run_knobs(self, p: Dict) -> None:
        """Batch, accumulation, precision and OOM history as the checkpointed run had them (not the config's)."""
        self.batch_size, self.accum = int(p["batch_size"]), int(p["grad_accum"])
        self.eval_batch_size = int(p.get("eval_batch_size", self.eval_batch_size))
        self.num_workers = int(p.get("num_workers", self.num_workers))
        self.steps_per_epoch = self._optimizer_steps_per_epoch()
        if "oom_state" in p:
            self.oom.state = OomState(**p["oom_state"])
            self.oom_events = json.loads(p["oom_events_json"])
            self.health.load_state_dict(json.loads(p["health_json"]))
            plans = json.loads(p["plans_json"])
            self.applied_batch_plan, self.applied_worker_plan = plans["batch"], plans["workers"]
        else:
            self.oom.state = OomState(self.batch_size, self.accum, amp_name(self.policy.amp_dtype))
        if self.oom.state.amp_dtype == "fp16" and self.policy.device.type == "cuda":
            self._escalate_precision()  # before the scaler state is loaded into the (now enabled) scaler
        self._loaders.clear()
