"""The classifier: any timm model by name, started from ImageNet weights when classification.pretrained is true.

Weights come from classification.pretrained_path (a local file), else timm's Hugging Face cache, else a download
(when the hub is reachable); offline without them is one clear error (pillsnap.models.pretrained).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn

from pillsnap.config import ClassificationConfig, PillSnapConfig
from pillsnap.core.checkpoints import check_compatible, load_checkpoint
from pillsnap.data.class_map import ClassMap
from pillsnap.models.pretrained import Reachable, load_matching, probe, read_state_dict, unavailable

log = logging.getLogger(__name__)
HF_HOST = "huggingface.co"
HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _hub_file(backbone: str) -> Tuple[Optional[str], Optional[str]]:
    """(hub repo id, cached weights file or None) for a timm model name."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None, None
    for name in HF_FILES:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and Path(found).is_file():
            return repo, found
    return repo, None


def _hub_weights(cfg: ClassificationConfig, reachable: Optional[Reachable]) -> Tuple[str, Optional[str]]:
    """(hub repo, cached file or None) of the backbone's weights; raises (naming the key and the ways out) when
    there are none to be had: no hub weights for the backbone, or not cached and the hub unreachable."""
    repo, cached = _hub_file(cfg.backbone)
    if repo is None:
        raise ValueError(f"classification.backbone={cfg.backbone!r} has no pretrained weights in timm; set "
                         "classification.pretrained_path or classification.pretrained=false")
    if cached is None and not probe(reachable)(HF_HOST):
        raise unavailable("classification", f"timm weights for {cfg.backbone} (hub {repo})", HF_HOST)
    return repo, cached


def _local_weights(cfg: ClassificationConfig) -> Path:
    path = Path(cfg.pretrained_path)
    if not path.is_file():
        raise FileNotFoundError(f"classification.pretrained_path: no such file {path}")
    return path


def classifier_weights_source(cfg: ClassificationConfig, reachable: Optional[Reachable] = None) -> str:
    """Where classification.pretrained's weights will come from, checked without building or downloading (the
    environment check): raises like build_classifier when they cannot be had."""
    if not cfg.pretrained:
        return "none (classification.pretrained=false)"
    if cfg.pretrained_path:
        return f"local file {_local_weights(cfg)}"
    repo, cached = _hub_weights(cfg, reachable)
    return f"cache {cached}" if cached else f"download from the hub ({repo})"


def build_classifier(cfg: ClassificationConfig, num_classes: int, reachable: Optional[Reachable] = None,
                     pretrained: Optional[bool] = None) -> nn.Module:
    """The timm model with `num_classes` outputs; `pretrained=False` forces a fresh model (loading a checkpoint)."""
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    use_pretrained = cfg.pretrained if pretrained is None else pretrained
    if not use_pretrained:
        log.info("classifier %s: classification.pretrained=false, training from scratch", cfg.backbone)
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    if cfg.pretrained_path:
        path = _local_weights(cfg)
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
        load_matching(model, read_state_dict(path), str(path))
        return model
    repo, cached = _hub_weights(cfg, reachable)
    overlay = dict(file=cached) if cached else None
    log.info("classifier %s: ImageNet weights from %s", cfg.backbone, cached or f"the hub ({repo}), downloading")
    return timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def load_classifier(cfg: PillSnapConfig, checkpoint: Path, class_map: ClassMap,
                    device: str | torch.device = "cpu") -> Tuple[nn.Module, ClassMap]:
    """The classifier of a checkpoint and its label space, checked against the global class map, in eval mode."""
    payload = load_checkpoint(checkpoint)
    labels = class_map.restrict(payload["k_codes"])
    check_compatible(payload, cfg.classification.backbone, len(labels), labels.hash, checkpoint)
    model = build_classifier(cfg.classification, len(labels), pretrained=False)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), labels
