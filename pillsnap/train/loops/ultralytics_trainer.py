"""Ultralytics' DetectionTrainer with the few changes PillSnap needs, each for a reason:

- the dataset dict is ours (already validated and written by `pillsnap.data.yolo_dataset`): ultralytics' own
  dataset check would try to fetch a font from the internet;
- the model is built from our rule-named yaml; its weights come from the previous stage (warm start) or the
  COCO weights of detection.pretrained; the activation is verified before the first step;
- fitness (best.pt and early stopping) is mAP@0.5, the monitor D-6 prescribes, with our one "improved?" rule;
- the LR curve is our one schedule (services/schedule.lr_factor) evaluated per epoch;
- the final re-validation of best.pt is skipped: every epoch was already validated and forwarded.

Imported lazily (it imports ultralytics at module level).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from ultralytics.models.yolo.detect import DetectionTrainer

from pillsnap.config import DetectionConfig
from pillsnap.models.activations import verify_torch_activations
from pillsnap.models.detector import build_from_yaml, pretrained_weights, transfer_pretrained
from pillsnap.train.services.checkpointer import improved
from pillsnap.train.services.schedule import lr_factor

log = logging.getLogger(__name__)
MAP50_KEY = "metrics/mAP50(B)"


class PillDetectionTrainer(DetectionTrainer):
    def __init__(self, overrides: Dict[str, Any], data: Dict[str, Any], detection: DetectionConfig,
                 init_checkpoint: Optional[Path] = None):
        # set before super().__init__: it calls get_dataset() and may call get_model()
        self._pill_data, self._detection, self._init = data, detection, init_checkpoint
        super().__init__(overrides=overrides)

    def get_dataset(self) -> Dict[str, Any]:
        return dict(self._pill_data)

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        model = build_from_yaml(cfg if isinstance(cfg, dict) else Path(cfg), verbose=False)
        if weights is not None:  # a resume: ultralytics hands over the checkpoint's model
            model.load(weights, verbose=False)
        else:
            source = self._init or pretrained_weights(self._detection)
            if source is not None:
                transfer_pretrained(model, source)
        verify_torch_activations(model, self._detection.activation)
        return model

    def _setup_scheduler(self):
        kind = "cosine" if self.args.cos_lr else "constant"
        self.lf = lambda epoch: lr_factor(epoch, self.epochs, 0, kind, self.args.lrf)  # warmup: by iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

    def validate(self):
        metrics = self.validator(self)
        if metrics is None:
            return None, None
        metrics.pop("fitness", None)
        fitness = float(metrics.get(MAP50_KEY, 0.0))
        if improved(fitness, self.best_fitness):
            self.best_fitness = fitness
        return metrics, fitness

    def final_eval(self) -> None:
        log.info("detector: final re-validation skipped (every epoch was validated); best.pt = best mAP@0.5 epoch")
