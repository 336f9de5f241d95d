"""The checkpoint file format (Annex 8): written atomically, loaded with weights_only=True, validated before use.

A resume looks at every candidate (recovery.pt, last.pt, last.prev.pt), skips the ones that are truncated
or corrupt with a warning, and takes the newest valid one by global step.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
# On a tie (recovery.pt written at the last step of an epoch, last.pt right after its validation) the first wins:
# last.pt, which holds the validated epoch.
RESUME_CANDIDATES = ("last.pt", "recovery.pt", "last.prev.pt")


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
