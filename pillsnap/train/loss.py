"""Classification loss: cross-entropy with label smoothing and optional class weights, or a weighted sampler."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from pillsnap.config import AugmentConfig, LossConfig


def class_weights(labels: Sequence[int], num_classes: int, mode: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights with mean 1 over present classes (absent classes get 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    if mode == "inverse_frequency":
        weights[present] = 1.0 / counts[present]
    elif mode == "effective_number":  # Cui et al. 2019: (1 - beta) / (1 - beta^n)
        weights[present] = (1 - beta) / (1 - np.power(beta, counts[present]))
    else:
        raise ValueError(f"loss.class_weight_mode={mode!r} is not inverse_frequency or effective_number")
    weights[present] *= present.sum() / weights[present].sum()
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights so that every class is drawn equally often by a weighted sampler."""
    per_class = class_weights(labels, num_classes, "inverse_frequency")
    return per_class[torch.as_tensor(list(labels), dtype=torch.long)].double()


class ClassificationLoss(nn.Module):
    """Cross-entropy for class indices; timm's soft-target cross-entropy for the soft targets of mixup / cutmix
    (their label smoothing is already in the targets)."""

    def __init__(self, hard: nn.Module):
        from timm.loss import SoftTargetCrossEntropy

        super().__init__()
        self.hard, self.soft = hard, SoftTargetCrossEntropy()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.soft(logits, targets) if targets.ndim == 2 else self.hard(logits, targets)


def build_criterion(cfg: LossConfig, labels: Sequence[int], num_classes: int,
                    augment: Optional[AugmentConfig] = None) -> nn.Module:
    if cfg.use_class_weights and cfg.weighted_sampler:
        raise ValueError("loss.use_class_weights and loss.weighted_sampler both on: that corrects the imbalance "
                         "twice; choose one")
    mixing = augment is not None and (augment.mixup > 0 or augment.cutmix > 0)
    if cfg.use_class_weights and mixing:
        raise ValueError("loss.use_class_weights with augment.mixup / augment.cutmix: soft targets carry no single "
                         "class to weight; use loss.weighted_sampler instead")
    weight: Optional[torch.Tensor] = None
    if cfg.use_class_weights:
        weight = class_weights(labels, num_classes, cfg.class_weight_mode)
    return ClassificationLoss(nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing))
