"""Checkpoints of a training run (Annex 8): WHEN to write which file, the ONE "did it improve?" rule, the training
fingerprint, and which checkpoint a run may resume. timm's CheckpointSaver is the model; the loop only asks.

  recovery.pt   every train.recovery_every_steps ticks (the whole run: a resume continues at that tick)
  last.pt       at every epoch end of any model (the whole run); the one before is kept as last.prev.pt
  best.pt       per model, in its own folder and schema, when its monitored metric improved (`improved`)
  emergency.pt  on demand: an exhausted OOM recovery, a non-finite loss (the weights before the failed step)

A run's checkpoints carry its training fingerprint: the config keys in TRAINING_KEYS, the batch plans and the
data it trains on (the subset's row hash, the detector's share of it, the warm start's sha256). A run resumes only
checkpoints with the same fingerprint; anything else (the advisor's overrides, a new batch plan, another subset, a
finished run whose best.pt is gone or is not the file it wrote: each best.pt's sha256 is recorded) is moved to
`checkpoints.previous/<time>/` and the run starts fresh. A key that is not listed (serving, reporting, evaluation,
logging, fault injection) never archives a run.
"""
from __future__ import annotations

import copy
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

from pillsnap.config import pick
from pillsnap.core import layout
from pillsnap.core.checkpoints import find_resume_checkpoint, save_checkpoint
from pillsnap.core.identity import file_sha256, short

log = logging.getLogger(__name__)

# What training computes depends on these config keys (a section stands for all its keys) and on nothing else in
# the config: the data is keyed by the subset hash, the batch sizes by the batch plans. A new key in one of these
# sections is part of the fingerprint by default; the few inside them that only steer the run are named apart.
TRAINING_KEYS = (
    "train", "classification", "augment", "loss", "optimization", "data.include_combination_crops",
    "dataloader.drop_last", "detection.enabled", "detection.scale", "detection.image_size", "detection.activation",
    "detection.pretrained", "detection.pretrained_path", "detection.include_single_images",
    "detection.close_mosaic_epochs",
    # the detector's validation (its mAP picks best.pt and stops early)
    "detection.conf_threshold", "detection.iou_threshold", "detection.max_det",
)
RUN_CONTROL_KEYS = (  # inside TRAINING_KEYS, but they change when and how a run is stopped or logged, not its math
    "train.resume", "train.crash_at_step", "train.recovery_every_steps", "train.step_log_interval",
    "train.stage_overrides", "train.oom.cooldown_sec", "train.oom.inject_at_steps",
    "train.oom.inject_detector_at_steps", "train.oom.inject_rank", "optimization.compile_backend",
    "train.distributed.node_rank", "train.distributed.rdzv_endpoint",
)


def improved(value: Optional[float], best: Optional[float], mode: str = "max", min_delta: float = 0.0) -> bool:
    """`value` improves on `best`: a real number that is at least `min_delta` better (ties count when it is 0,
    as in ultralytics' stopper: a flat 0.0 early in training is not a plateau). NaN / None never improve."""
    if value is None or not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return (value - best if mode == "max" else best - value) >= min_delta


def training_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The TRAINING_KEYS of a resolved config (as a dict), less the RUN_CONTROL_KEYS."""
    relevant = {key: copy.deepcopy(pick(config, key)) for key in TRAINING_KEYS}
    for dotted in RUN_CONTROL_KEYS:
        section, _, rest = next((k, ".", dotted[len(k) + 1:]) for k in TRAINING_KEYS if dotted.startswith(k + "."))
        node = relevant[section]
        *path, leaf = rest.split(".")
        for part in path:
            node = node[part]
        node.pop(leaf)
    return relevant


def training_fingerprint(config: Mapping[str, Any], plans: Optional[Mapping[str, Any]] = None,
                         data: Optional[Mapping[str, Any]] = None) -> str:
    """What a resumable run must share with this one: its training_config, the batch / accumulation of each
    model's batch plan, and `data` (train_stage's data_identity: what it trains on and starts from)."""
    relevant = training_config(config)
    batches = {name: {k: (plan or {}).get(k) for k in ("batch_size", "grad_accum")}
               for name, plan in sorted((plans or {}).items())}
    text = json.dumps({"config": relevant, "batch_plans": batches, "data": dict(data or {})}, sort_keys=True,
                      default=str)
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
    version, internal, gauss = json.loads(state["python_json"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(state["numpy_json"])
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointPolicy:
    """Owns when a run writes which checkpoint, each model's best value so far, and which checkpoint to resume."""

    def __init__(self, ckpt_dir: Path, config_json: str, fingerprint: str, recovery_every: Optional[int],
                 writes: bool = True):
        self.dir, self.config_json, self.fingerprint = Path(ckpt_dir), config_json, fingerprint
        self.writes = writes  # with several ranks only rank 0 writes; the others follow the same decisions
        self.recovery_every = recovery_every or 0
        self.best: Dict[str, Dict[str, Any]] = {}  # model -> {"value", "epoch", "sha256" of the best.pt written}

    # ------------------------------------------------------------------ when
    def recovery_due(self, tick: int) -> bool:
        return bool(self.recovery_every) and tick % self.recovery_every == 0

    def is_new_best(self, model: str, value: Optional[float], mode: str, epoch: int) -> bool:
        """The model's monitored value at this epoch improves on its best so far (then it is the new best)."""
        best = self.best.get(model, {}).get("value")
        if not improved(value, best, mode):
            return False
        self.best[model] = {"value": float(value), "epoch": epoch}
        return True

    def best_of(self, model: str) -> Tuple[Optional[float], int]:
        best = self.best.get(model)
        return (best["value"], best["epoch"]) if best else (None, -1)

    def best_sha256(self, model: str) -> Optional[str]:
        return (self.best.get(model) or {}).get("sha256")

    def save_best(self, model: str, payload: Dict[str, Any], directory: Path) -> Path:
        """best.pt, and its sha256 recorded: a resume or a cached result whose best.pt differs is not this run's."""
        path = self.save(layout.BEST, payload, directory)
        if self.writes:
            self.best[model]["sha256"] = file_sha256(path)
        return path

    # ------------------------------------------------------------------ what
    def save(self, name: str, payload: Dict[str, Any], directory: Optional[Path] = None) -> Path:
        """last.pt keeps its previous version as last.prev.pt (a fallback if the new one is ever unreadable)."""
        path = Path(directory or self.dir) / name
        if not self.writes:
            return path
        full = {**payload, "config": self.config_json, "fingerprint": self.fingerprint}
        return save_checkpoint(path, full, keep_previous=(name == "last.pt"))

    def state_dict(self) -> Dict[str, Any]:
        return {"best": json.loads(json.dumps(self.best))}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = dict(state["best"])

    # ------------------------------------------------------------------ resume
    def resumable(self, best_files: Callable[[Dict[str, Any]], Mapping[str, Path]] = lambda payload: {},
                  also_archive: Iterable[Path] = ()) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest valid checkpoint of THIS training, or None (stale ones are archived first).

        `best_files(payload)`: {model: best.pt} that the checkpointed run had written (one per model that recorded
        a best epoch); a run missing one, or whose file is not the one it wrote (by sha256), cannot be resumed.
        """
        found = find_resume_checkpoint(self.dir) if self.dir.is_dir() else None
        if found is None:
            return None
        path, payload = found
        reason = None
        if payload.get("fingerprint") != self.fingerprint:
            reason = "they come from a different training configuration or batch plan"
        else:
            reason = _best_files_problem(best_files(payload), payload["checkpoint_policy"]["best"])
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


def _best_files_problem(files: Mapping[str, Path], recorded: Mapping[str, Mapping[str, Any]]) -> Optional[str]:
    """Why the best.pt files a checkpointed run wrote cannot be trusted, or None. Checkpoints from before the
    sha256 was recorded are checked for presence only."""
    missing = [str(path) for path in files.values() if not Path(path).is_file()]
    if missing:
        return f"{', '.join(missing)} is missing from a run that had recorded a best epoch"
    for model, path in files.items():
        expected = (recorded.get(model) or {}).get("sha256")
        actual = file_sha256(path) if expected else None
        if actual != expected:
            return f"{path} is not the best.pt this run wrote (sha256 {short(actual)}, recorded {short(expected)})"
    return None
