"""Latency as the gates read it: batch 1 on the serving device, after a warm-up, as p50 / p95 in ms.

The p95 a gate reads is the MEDIAN of the p95s of WINDOWS consecutive windows of SAMPLES_PER_WINDOW calls each:
one stall of a shared host (another process, a page-cache miss, the collector) fills one window's tail and one
30-call p95 with it (444 ms, then 10.8 ms for the same model on a re-run); it takes three of five stalled windows to
move the median. Each window's p95 and the plain p95 over every call are reported beside it.

- pipeline_latency: end to end through the serving Predictor (decode, preprocess, model, top-k): single mode, or
  with a detector the whole two-stage pipeline in auto mode (the detector and every crop where a photo needs it);
- classifier_model_latency / detector_model_latency: the model's forward pass alone at its input size.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.infer.engines import ClassifierEngine

WARMUP, WINDOWS, SAMPLES_PER_WINDOW = 5, 5, 20
SAMPLES = WINDOWS * SAMPLES_PER_WINDOW


def percentiles(times_ms: Sequence[float], windows: int = WINDOWS) -> Dict[str, Any]:
    """p50 and p95 in ms, each the median over `windows` consecutive windows of the calls (one window when there
    are fewer than 2 calls a window); every window's p95 and the plain p95 of all calls beside them."""
    if not len(times_ms):
        return {}
    windows = max(1, min(windows, len(times_ms) // 2))
    parts = np.array_split(np.asarray(times_ms, dtype=float), windows)
    p95s = [float(np.percentile(p, 95)) for p in parts]
    return {"p50": float(np.median([np.percentile(p, 50) for p in parts])), "p95": float(np.median(p95s)),
            "n": len(times_ms), "windows": windows, "window_p95": p95s,
            "p95_all_calls": float(np.percentile(times_ms, 95))}


def _timed(run: Callable[[], None], samples: int = SAMPLES) -> Dict[str, Any]:
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
