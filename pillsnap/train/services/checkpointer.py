"""Checkpoints of a training run (Annex 8), the ONE "did it improve?" rule, and which checkpoints may be resumed.

A run's checkpoints carry its training fingerprint (the resolved training config and the batch plans). A run
resumes only checkpoints with the same fingerprint; anything else (the advisor's overrides, a new batch plan, a
finished run whose best.pt is gone) is moved to `checkpoints.previous/<time>/` and the run starts fresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

from pillsnap.core.checkpoints import find_resume_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# Settings that do not change what training computes: a difference in these still allows a resume.
_NOT_TRAINING = ("orchestration", "logging", "inference", "export", "evaluation", "synth")
_NOT_TRAINING_TRAIN_KEYS = ("crash_at_step", "resume")
_NOT_TRAINING_OOM_KEYS = ("inject_at_steps", "inject_detector_at_steps")


def improved(value: Optional[float], best: Optional[float], mode: str = "max", min_delta: float = 0.0) -> bool:
    """`value` improves on `best`: a real number that is at least `min_delta` better (ties count when it is 0,
    as in ultralytics' stopper: a flat 0.0 early in training is not a plateau). NaN / None never improve."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return (value - best if mode == "max" else best - value) >= min_delta


def training_fingerprint(config: Mapping[str, Any], plans: Optional[Mapping[str, Any]] = None) -> str:
    """What a resumable run must share with this one: the training-relevant config and the batch plans."""
    relevant = {k: v for k, v in config.items() if k not in _NOT_TRAINING}
    train = {k: v for k, v in config.get("train", {}).items() if k not in _NOT_TRAINING_TRAIN_KEYS}
    train["oom"] = {k: v for k, v in train.get("oom", {}).items() if k not in _NOT_TRAINING_OOM_KEYS}
    relevant["train"] = train
    batches = {name: {k: (plan or {}).get(k) for k in ("batch_size", "grad_accum")}
               for name, plan in sorted((plans or {}).items())}
    text = json.dumps({"config": relevant, "batch_plans": batches}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rng_state() -> Dict[str, Any]:
    """torch (CPU, CUDA) and the Python / NumPy global generators: ultralytics' detector augmentation draws from
    the last two, so an exact resume needs them too. Stored as tensors and JSON text (weights_only loading)."""
    state = {"torch": torch.get_rng_state(),
             "python_json": json.dumps(random.getstate()),
             "numpy_json": json.dumps([v.tolist() if hasattr(v, "tolist") else v for v in np.random.get_state()])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python_json" in state:
        version, internal, gauss = json.loads(state["python_json"])
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = json.loads(state["numpy_json"])
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes a run's checkpoints (with its config and fingerprint) and finds the one to resume."""

    def __init__(self, ckpt_dir: Path, config_json: str, fingerprint: str):
        self.dir, self.config_json, self.fingerprint = Path(ckpt_dir), config_json, fingerprint

    def save(self, name: str, payload: Dict[str, Any], directory: Optional[Path] = None) -> Path:
        """last.pt keeps its previous version as last.prev.pt (a fallback if the new one is ever unreadable)."""
        full = {**payload, "config": self.config_json, "fingerprint": self.fingerprint}
        return save_checkpoint(Path(directory or self.dir) / name, full, keep_previous=(name == "last.pt"))

    def resumable(self, best_files: Callable[[Dict[str, Any]], Iterable[Path]] = lambda payload: (),
                  also_archive: Iterable[Path] = ()) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest valid checkpoint of THIS training, or None (stale ones are archived first).

        `best_files(payload)`: the best.pt files that the checkpointed run had written (one per model that
        recorded a best epoch); a run missing one cannot be resumed, its best weights are gone.
        """
        found = find_resume_checkpoint(self.dir) if self.dir.is_dir() else None
        if found is None:
            return None
        path, payload = found
        reason = None
        if payload.get("fingerprint") != self.fingerprint:
            reason = "they come from a different training configuration or batch plan"
        else:
            missing = [str(b) for b in best_files(payload) if not Path(b).is_file()]
            if missing:
                reason = f"{', '.join(missing)} is missing from a run that had recorded a best epoch"
        if reason is None:
            return path, payload
        self.archive(reason, also_archive)
        return None

    def archive(self, reason: str, also: Iterable[Path] = ()) -> Path:
        """Move the checkpoint folder and `also` (folders or files beside it) aside; nothing is deleted."""
        target = self.dir.parent / "checkpoints.previous" / f"{int(time.time() * 1000)}"
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted({self.dir, *(Path(p) for p in also)}):
            if item.exists():
                item.rename(target / item.relative_to(self.dir.parent).as_posix().replace("/", "__"))
        log.warning("%s: %s; moved to %s and starting fresh", self.dir, reason, target)
        return target
