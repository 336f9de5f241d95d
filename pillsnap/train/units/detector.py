"""The detector unit: YOLO11 (one class "pill") with ultralytics' detection loss, driven by our loops.

A batch is the dict ultralytics' YOLODataset.collate_fn makes: `img` (B, 3, S, S) uint8, and per box `cls`,
`bboxes` (normalised xywh) and `batch_idx` (which image it belongs to). The loss is per image (ultralytics'
summed loss / B), so the learning rate means the same at any batch size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from pillsnap.config import PillSnapConfig
from pillsnap.infer.detection import DetSample, evaluate_detector, map_detector
from pillsnap.models.detector import (DETECTOR_CLASS_MAP_HASH, backbone_name, build_detector, detector_payload,
                                      transfer_pretrained)
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.services.policy import Policy, prepare_model
from pillsnap.train.units.base import TrainUnit

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
VAL_KEYS = ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall")


def detector_param_groups(model: nn.Module, weight_decay: float):
    """Decay conv/linear weights only: biases and normalisation parameters are not regularised."""
    norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if name == "bias" or isinstance(module, norms) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def detector_hyperparameters(cfg: PillSnapConfig):
    """Ultralytics' default hyperparameters at our image size and batch (loss gains, augmentation)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    return get_cfg(DEFAULT_CFG, {"imgsz": cfg.detection.image_size, "batch": cfg.train.detection.batch_size})


class DetectorUnit(TrainUnit):
    name, log_tag, config_key = "detector", "[train/det]", "train.detection"
    monitor, mode = "mAP_0.5", "max"  # D-6: the detector's early stopping and best.pt follow mAP@0.5

    def __init__(self, cfg: PillSnapConfig, policy: Policy, model_dir: Path, val_samples: Sequence[DetSample],
                 val_read: Optional[Callable[[int], Any]] = None, init_checkpoint: Optional[Path] = None,
                 compile_backend: Optional[Callable] = None,
                 world_size: int = 1):
        # A warm start replaces the COCO weights anyway: no need to fetch them.
        model = build_detector(cfg.detection, model_dir, pretrained=False if init_checkpoint else None)
        model = prepare_model(model, policy)
        if init_checkpoint is not None:
            transfer_pretrained(model, init_checkpoint)
        super().__init__(cfg, cfg.train.detection, model, detector_param_groups(model, cfg.train.weight_decay),
                         policy, compile_backend, world_size)
        self.hyp = detector_hyperparameters(cfg)
        model.args = self.hyp  # the detection loss reads its box/cls/dfl gains here
        self.criterion = model.init_criterion()
        self.backbone = backbone_name(cfg.detection)
        self.val_samples, self.val_read = val_samples, val_read  # val_read: the photos from the detector store
        self.last_items: Dict[str, float] = {}

    # ------------------------------------------------------------------ batches
    def loss(self, batch: Dict[str, Any]) -> torch.Tensor:
        dev = self.policy.device
        b = {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        b["img"] = self.images(b["img"])
        loss, items = self.criterion(self.train_model(b["img"]), b)
        self.last_items = {k: float(v) for k, v in zip(LOSS_NAMES, items.detach().flatten().tolist())} \
            if isinstance(items, torch.Tensor) else {k: float(v) for k, v in items.items()}
        return loss.sum() / b["img"].shape[0]

    def images(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 photos as the model's float input, in the policy's memory format."""
        x = img.to(self.policy.device, non_blocking=True).float() / 255
        return x.contiguous(memory_format=torch.channels_last) if self.policy.channels_last else x

    def eval_forward(self, model: torch.nn.Module, batch: Dict[str, Any]) -> Any:
        return model(self.images(batch["img"]))

    def split(self, batch: Dict[str, Any], size: int) -> List[Dict[str, Any]]:
        out, n = [], self.batch_len(batch)
        for start in range(0, n, size):
            stop = min(n, start + size)
            keep = (batch["batch_idx"] >= start) & (batch["batch_idx"] < stop)
            part = {}
            for key, value in batch.items():
                if key in ("cls", "bboxes"):
                    part[key] = value[keep]
                elif key == "batch_idx":
                    part[key] = value[keep] - start
                elif isinstance(value, (torch.Tensor, list, tuple)):
                    part[key] = value[start:stop]
                else:
                    part[key] = value
            out.append(part)
        return out

    def batch_len(self, batch: Dict[str, Any]) -> int:
        return len(batch["img"])

    def sample_ids(self, batch: Dict[str, Any]) -> List[str]:
        return [Path(p).stem for p in batch.get("im_file", [])]

    # ------------------------------------------------------------------ evaluation and checkpoints
    def validate(self, comm: Collectives = Collectives()) -> Dict[str, Any]:
        """Each rank scores its slice of the validation photos; the matches are gathered (one process's figures)."""
        model = self.eval_module
        was_training = model.training
        try:
            detector = map_detector(model, self.cfg.detection.image_size, self.eval_batch_size)
            return evaluate_detector(detector, self.val_samples, self.cfg.detection.conf_threshold, comm.rank,
                                     comm.world_size, comm.gather, self.val_read)
        finally:
            model.train(was_training)

    def identity(self) -> Dict[str, Any]:
        return {"backbone": self.backbone, "num_classes": 1, "class_map_hash": DETECTOR_CLASS_MAP_HASH,
                "image_size": self.cfg.detection.image_size}

    def weights_payload(self) -> Dict[str, Any]:
        return detector_payload(self.eval_module, self.backbone, self.cfg.detection.image_size)
