"""Checkpoints (Annex 8): written atomically, loaded with weights_only=True, validated before use.

A resume looks at every candidate (recovery.pt, last.pt, last.prev.pt), skips the ones that are truncated
or corrupt with a warning, and takes the newest valid one by global step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
RESUME_CANDIDATES = ("recovery.pt", "last.pt", "last.prev.pt")


class CheckpointError(RuntimeError):
    pass


class CheckpointMismatchError(CheckpointError):
    pass


def save_checkpoint(path: Path, payload: Dict[str, Any], keep_previous: bool = False) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save({**payload, "schema_version": SCHEMA_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        path.replace(path.with_name(path.stem + ".prev.pt"))
    tmp.replace(path)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file: all mean "unusable"
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not a PillSnap checkpoint (no 'model' entry)")
    return payload


def check_compatible(payload: Dict[str, Any], backbone: str, num_classes: int, class_map_hash: str,
                     path: Path | str = "checkpoint") -> None:
    """Stop with both sides named rather than load weights into the wrong model or label space."""
    problems = []
    if payload.get("backbone") != backbone:
        problems.append(f"backbone: checkpoint {payload.get('backbone')!r} vs config {backbone!r}")
    if payload.get("num_classes") != num_classes:
        problems.append(f"num_classes: checkpoint {payload.get('num_classes')} vs current {num_classes}")
    if payload.get("class_map_hash") != class_map_hash:
        problems.append(f"class map: checkpoint {payload.get('class_map_hash')} vs current {class_map_hash}")
    if problems:
        raise CheckpointMismatchError(f"{path} does not match this run: " + "; ".join(problems))


def find_resume_checkpoint(ckpt_dir: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest valid checkpoint among the resume candidates, or None if there is none."""
    found: List[Tuple[int, Path, Dict[str, Any]]] = []
    for name in RESUME_CANDIDATES:
        path = Path(ckpt_dir) / name
        if not path.is_file():
            continue
        try:
            payload = load_checkpoint(path)
        except CheckpointError as e:
            log.warning("ignoring %s; trying an earlier checkpoint", e)
            continue
        found.append((int(payload.get("global_step", -1)), path, payload))
    if not found:
        return None
    step, path, payload = max(found, key=lambda t: t[0])
    log.info("resuming from %s (epoch %s, global step %d)", path, payload.get("epoch"), step)
    return path, payload


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings that do not change what training computes: a difference in these still allows a resume.
_NOT_TRAINING = ("orchestration", "logging", "inference", "export", "evaluation")
_NOT_TRAINING_TRAIN_KEYS = ("crash_at_step", "resume")


def training_fingerprint(config: Dict[str, Any]) -> str:
    relevant = {k: v for k, v in config.items() if k not in _NOT_TRAINING}
    relevant["train"] = {k: v for k, v in config.get("train", {}).items() if k not in _NOT_TRAINING_TRAIN_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def prepare_checkpoint_dir(ckpt_dir: Path, config: Dict[str, Any]) -> Optional[str]:
    """Move old checkpoints aside when resuming them would be wrong; returns why, or None if kept.

    Wrong means: they were trained with a different configuration (a re-run with new settings must start
    fresh), or the run finished but its best.pt is gone (best weights cannot be recovered by resuming).
    A crash before the first epoch ended (recovery.pt only) is kept, so the retry resumes.
    """
    ckpt_dir = Path(ckpt_dir)
    found = find_resume_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if found is None:
        return None
    _, payload = found
    reason = None
    if training_fingerprint(json.loads(payload["config"])) != training_fingerprint(config):
        reason = "checkpoints come from a different training configuration"
    elif (ckpt_dir / "last.pt").is_file() and not (ckpt_dir / "best.pt").is_file():
        reason = "best.pt is missing from a run that had finished an epoch"
    if reason:
        archive = ckpt_dir.parent / "checkpoints.previous" / f"{int(time.time())}"
        archive.parent.mkdir(parents=True, exist_ok=True)
        ckpt_dir.rename(archive)
        log.warning("%s: %s; moved to %s and starting fresh", ckpt_dir, reason, archive)
    return reason
