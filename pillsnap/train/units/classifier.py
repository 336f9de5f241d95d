"""The classifier unit: a timm model over the stage's label space (the global class map restricted to its classes).

A batch is the dict `pillsnap.data.datasets.Collate` makes. Its images arrive either finished (augmented and
normalised in the loader's workers: the CPU path) or as uint8, finished here on the device (the GPU path).
Mixup / CutMix give soft targets; their loss is timm's SoftTargetCrossEntropy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from pillsnap.config import PillSnapConfig
from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.data.augment import BatchAugment
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import Batch, finish_batch
from pillsnap.metrics.classification import metrics_from_top, top_predictions
from pillsnap.models.classifier import build_classifier
from pillsnap.train.loss import build_criterion
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.services.policy import Policy, prepare_model
from pillsnap.train.units.base import TrainUnit
from pillsnap.train.warm_start import warm_start_from

VAL_KEYS = ("accuracy", "macro_f1", "top5", "val_loss")


class ClassifierUnit(TrainUnit):
    name, log_tag, config_key = "classifier", "[train]", "train.classification"

    def __init__(self, cfg: PillSnapConfig, labels: ClassMap, train_labels: List[int], policy: Policy,
                 image_ids: List[str], val_loader: DataLoader, init_checkpoint: Optional[Path] = None,
                 compile_backend: Optional[Callable] = None, world_size: int = 1):
        self.labels, self.image_ids, self.val_loader = labels, image_ids, val_loader
        # A warm start replaces the ImageNet weights anyway: no need to fetch them.
        fresh = build_classifier(cfg.classification, len(labels), pretrained=False if init_checkpoint else None)
        model = prepare_model(fresh, policy)
        if init_checkpoint is not None:
            warm_start_from(model, load_checkpoint(init_checkpoint), labels, cfg.classification.backbone)
        super().__init__(cfg, cfg.train.classification, model, model.parameters(), policy, compile_backend,
                         world_size)
        tc = cfg.train
        self.monitor, self.mode = tc.early_stopping.monitor, tc.early_stopping.mode
        self.criterion = build_criterion(cfg.loss, train_labels, len(labels), cfg.augment).to(policy.device)
        self.augment = BatchAugment(cfg.augment, cfg.classification.image_size, len(labels),
                                    cfg.loss.label_smoothing, crop_padding=cfg.classification.crop_padding)

    # ------------------------------------------------------------------ batches
    def to_device(self, batch: Batch, train: bool) -> Batch:
        dev = self.policy.device
        # the pixels and targets go to the device; seeds, boxes and indices stay where augmentation reads them
        moved = {k: v.to(dev, non_blocking=True) if k in ("images", "targets") else v for k, v in batch.items()}
        moved = finish_batch(moved, self.augment if train else None)
        if self.policy.channels_last:
            moved["images"] = moved["images"].contiguous(memory_format=torch.channels_last)
        return moved

    def loss(self, batch: Batch) -> torch.Tensor:
        b = self.to_device(batch, train=True)
        return self.criterion(self.train_model(b["images"]), b["targets"])

    def eval_forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(self.to_device(batch, train=False)["images"])

    def split(self, batch: Batch, size: int) -> List[Batch]:
        n = self.batch_len(batch)
        return [{k: v[s:s + size] for k, v in batch.items()} for s in range(0, n, size)]

    def batch_len(self, batch: Batch) -> int:
        return len(batch["indices"])

    def sample_ids(self, batch: Batch) -> List[str]:
        return [self.image_ids[int(i)] for i in batch["indices"]]

    # ------------------------------------------------------------------ evaluation and checkpoints
    @torch.no_grad()
    def validate(self, comm: Collectives = Collectives()) -> Dict[str, Any]:
        """Each rank predicts its slice of the validation samples (the loader's RankSlice); the ranks gather each
        sample's position, label, top-5 and loss, and every rank computes the metrics of the whole set from them
        in sample order: the figures of one process, n × 7 numbers sent instead of n × classes logits."""
        model = self.eval_module
        was_training = model.training
        model.eval()
        parts: List[np.ndarray] = []
        try:
            for batch in self.val_loader:
                if batch is None:
                    continue
                b = self.to_device(batch, train=False)
                out = model(b["images"]).float()  # fp32 validation, no autocast (D-6)
                loss = torch.nn.functional.cross_entropy(out, b["targets"], reduction="none").double().cpu().numpy()
                top = top_predictions(out.cpu().numpy())
                parts.append(np.column_stack([batch["indices"].numpy(), b["targets"].cpu().numpy(), top, loss]))
        finally:
            model.train(was_training)
        mine = np.concatenate(parts) if parts else np.zeros((0, 0))
        rows = np.concatenate([p for p in comm.gather(mine) if len(p)] or [np.zeros((0, 3))])
        if not len(rows):
            return {"n": 0, **{k: float("nan") for k in VAL_KEYS}}
        rows = rows[np.argsort(rows[:, 0], kind="stable")]
        y_true, top = rows[:, 1].astype(np.int64), rows[:, 2:-1].astype(np.int64)
        metrics = metrics_from_top(y_true, top, self.labels.k_codes)
        metrics["val_loss"] = float(rows[:, -1].sum() / len(rows))
        return metrics

    def identity(self) -> Dict[str, Any]:
        """What check_compatible and warm start compare: backbone, label space, image size."""
        c = self.cfg.classification
        return {"backbone": c.backbone, "num_classes": len(self.labels), "class_map_hash": self.labels.hash,
                "k_codes": self.labels.k_codes, "image_size": c.image_size}

    def weights_payload(self) -> Dict[str, Any]:
        return {"model": self.eval_module.state_dict(), **self.identity()}
