"""Ultralytics' DetectionTrainer with the few changes PillSnap needs, each for a reason:

- the dataset dict is ours (already validated and written by `pillsnap.data.yolo_dataset`): ultralytics' own
  dataset check would try to fetch a font from the internet;
- the model is built from our rule-named yaml, pretrained weights come only from a local file, and the activation
  is verified before the first step;
- fitness (best.pt and early stopping) is mAP@0.5, the monitor D-6 prescribes for the detector;
- the final re-validation of best.pt is skipped: every epoch was already validated and forwarded, and the
  standalone validator would run the networked dataset check again.

Imported only after `prepare_ultralytics` (it imports ultralytics at module level).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ultralytics.models.yolo.detect import DetectionTrainer

from pillsnap.models.activations import verify_torch_activations
from pillsnap.models.detector import build_from_yaml, transfer_pretrained

log = logging.getLogger(__name__)
MAP50_KEY = "metrics/mAP50(B)"


class PillDetectionTrainer(DetectionTrainer):
    def __init__(self, overrides: Dict[str, Any], data: Dict[str, Any], activation: str,
                 pretrained_path: Optional[str]):
        # set before super().__init__: it calls get_dataset() and may call get_model()
        self._pill_data, self._activation, self._pretrained = data, activation, pretrained_path
        super().__init__(overrides=overrides)

    def get_dataset(self) -> Dict[str, Any]:
        return dict(self._pill_data)

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        model = build_from_yaml(cfg if isinstance(cfg, dict) else Path(cfg), verbose=False)
        if weights is not None:  # a resume: ultralytics hands over the checkpoint's model
            model.load(weights, verbose=False)
        elif self._pretrained:
            transfer_pretrained(model, self._pretrained)
        verify_torch_activations(model, self._activation)
        return model

    def validate(self):
        metrics = self.validator(self)
        if metrics is None:
            return None, None
        metrics.pop("fitness", None)
        fitness = float(metrics.get(MAP50_KEY, 0.0))
        if self.best_fitness is None or self.best_fitness < fitness:
            self.best_fitness = fitness
        return metrics, fitness

    def final_eval(self) -> None:
        log.info("detector: final re-validation skipped (every epoch was validated); best.pt = best mAP@0.5 epoch")
