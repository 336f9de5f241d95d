"""Latency as the gates read it: batch 1 on the serving device, after a warm-up, as p50 / p95 in ms.

- pipeline_latency: end to end through the serving Predictor (decode, preprocess, model, top-k): single mode, or
  with a detector the whole two-stage pipeline in auto mode (the detector and every crop where a photo needs it);
- classifier_model_latency / detector_model_latency: the model's forward pass alone at its input size.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.infer.engines import ClassifierEngine

WARMUP, SAMPLES = 5, 30


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    if not len(times_ms):
        return {}
    return {"p50": float(np.percentile(times_ms, 50)), "p95": float(np.percentile(times_ms, 95)), "n": len(times_ms)}


def _timed(run: Callable[[], None], samples: int = SAMPLES) -> Dict[str, float]:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return percentiles(times)


def pipeline_latency(cfg: PillSnapConfig, engine: ClassifierEngine, labels: ClassMap, photos: Sequence[str],
                     mode: str = "single", detector_loader: Optional[Callable[[], object]] = None) -> Dict[str, float]:
    """End-to-end latency of the serving pipeline in `mode` over real photos (cycled when fewer than needed); the
    detector, when given, is loaded as serving loads it."""
    from pillsnap.infer.predict import Predictor

    if not photos:
        return {}
    predictor = Predictor(engine, labels, cfg.classification.image_size, cfg.classification.crop_padding,
                          cfg.inference.single_confidence_threshold, detector_loader, default_mode=mode)
    order = iter(list(photos) * (1 + (WARMUP + SAMPLES) // len(photos)))
    return {**_timed(lambda: predictor.predict(next(order), mode)), "photos": len(photos), "mode": mode}


def classifier_model_latency(engine: ClassifierEngine, image_size: int) -> Dict[str, float]:
    batch = np.zeros((1, 3, image_size, image_size), np.float32)
    return _timed(lambda: engine.logits(batch))


def detector_model_latency(predict_raw: Callable[[np.ndarray], np.ndarray], image_size: int) -> Dict[str, float]:
    batch = np.zeros((1, 3, image_size, image_size), np.float32)
    return _timed(lambda: predict_raw(batch))
