"""Where pretrained weights come from: a local file, the library's own download cache, or a download.

The spec starts both models from pretrained weights (timm ImageNet, ultralytics COCO). When the weights are
neither a local file (`*.pretrained_path`) nor in the download cache, the hub is probed with one short connection
attempt; offline, the run stops at once with one error that names the key and both ways out, instead of minutes
of silent retries inside the download libraries.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0
Reachable = Callable[[str], bool]


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message names the key and the ways out."""


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable(section: str, what: str, where: str) -> PretrainedWeightsUnavailable:
    return PretrainedWeightsUnavailable(
        f"{section}.pretrained=true: {what} is not in the local cache and {where} cannot be reached (offline?). "
        f"Either set {section}.pretrained_path=/path/to/weights (a local file), or {section}.pretrained=false to "
        "train from scratch.")


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, a plain state dict, or a dict holding one under model / state_dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return payload[key]
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not a state dict")
    return payload


def load_matching(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> int:
    """Copy every tensor whose name and shape match (a different head, e.g. 1000 ImageNet classes, is skipped)."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    model.load_state_dict(matched, strict=False)
    skipped = sorted(set(own) - set(matched))
    log.info("pretrained weights from %s: %d/%d tensors loaded%s", source, len(matched), len(own),
             f"; kept fresh: {', '.join(skipped[:6])}{' …' if len(skipped) > 6 else ''}" if skipped else "")
    return len(matched)


def probe(reachable: Optional[Reachable]) -> Reachable:
    return reachable or host_reachable
