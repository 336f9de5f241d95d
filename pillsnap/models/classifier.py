"""The classifier: any timm model by name; pretrained weights only from a local file, never the hub."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import timm
import torch.nn as nn

from pillsnap.config import ClassificationConfig

log = logging.getLogger(__name__)


def build_classifier(cfg: ClassificationConfig, num_classes: int, pretrained_path: Optional[str] = None) -> nn.Module:
    path = pretrained_path or cfg.pretrained_path
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"classification.pretrained_path: no such file {path}")
        log.info("classifier %s: pretrained weights from %s", cfg.backbone, path)
        return timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    log.info("classifier %s: no pretrained_path, training from scratch", cfg.backbone)
    return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
