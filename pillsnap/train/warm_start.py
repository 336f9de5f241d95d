"""Progressive warm start: Stage n+1 starts from Stage n's best weights. The head is remapped by K-code,
so known classes keep their rows and new classes start fresh (never a positional copy)."""
from __future__ import annotations

import logging
from typing import Dict

import torch.nn as nn

from pillsnap.data.class_map import ClassMap
from pillsnap.core.checkpoints import CheckpointMismatchError

log = logging.getLogger(__name__)


def _head_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError("cannot locate the classifier head of the model")


def warm_start_from(model: nn.Module, payload: Dict, label_space: ClassMap, backbone: str) -> Dict[str, int]:
    if payload.get("backbone") != backbone:
        raise CheckpointMismatchError(f"warm start: checkpoint backbone {payload.get('backbone')!r} "
                                      f"vs config {backbone!r}")
    old_index = {k: i for i, k in enumerate(payload["k_codes"])}
    prefix = _head_prefix(model)
    own = model.state_dict()
    new_state, copied_rows = {}, 0
    rows = [(j, old_index[k]) for j, k in enumerate(label_space.k_codes) if k in old_index]
    for key, value in own.items():
        old = payload["model"].get(key)
        if old is None:
            new_state[key] = value
        elif key.startswith(prefix):
            fresh = value.clone()
            for j, i in rows:
                fresh[j] = old[i]
            new_state[key] = fresh
            copied_rows = len(rows)
        elif old.shape == value.shape:
            new_state[key] = old
        else:
            raise CheckpointMismatchError(f"warm start: {key} has shape {tuple(old.shape)} in the checkpoint "
                                          f"vs {tuple(value.shape)} in the model")
    model.load_state_dict(new_state)
    stats = {"known_classes": copied_rows, "new_classes": len(label_space) - copied_rows}
    log.info("warm start: backbone copied; head rows kept for %d known classes, %d new classes start fresh",
             stats["known_classes"], stats["new_classes"])
    return stats
