"""Stage-level detector results: the detector's validation metrics and combination accuracy on the stage's
validation combination images (detect, crop every detection, classify every crop)."""
from __future__ import annotations

import logging
from typing import Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.core import layout

log = logging.getLogger(__name__)
DETECTION_KEYS = {"mAP_0.5": ("mAP_0.5", "map50"), "mAP_0.5_0.95": ("mAP_0.5_0.95", "map"),
                  "precision": ("precision",), "recall": ("recall",)}


def detection_results(train: Optional[Dict]) -> Optional[Dict]:
    """The detector's validation metrics in the criteria's names, or None when no detector was trained."""
    if not train:
        return None
    val = train.get("val_metrics") or {}
    out = {name: next((val[k] for k in keys if val.get(k) is not None), None) for name, keys in DETECTION_KEYS.items()}
    out["not_measured"] = [k for k, v in out.items() if v is None]
    return out


def combination_accuracy(cfg: PillSnapConfig, stage: int, subset: pd.DataFrame, class_map: ClassMap) -> Dict:
    from pillsnap.core.devices import device_name, evaluation_device, serving_device
    from pillsnap.evaluate.combination import combination_samples, evaluate_combinations
    from pillsnap.infer.detection import torch_raw_predictor
    from pillsnap.infer.engines import TorchClassifierEngine, build_detector
    from pillsnap.infer.latency import detector_model_latency
    from pillsnap.infer.preprocess import normalise_batch
    from pillsnap.models.classifier import load_classifier
    from pillsnap.models.detector import load_detector_checkpoint

    val = subset[(subset["split"] == "val") & (subset["kind"] == "combination")]
    detector_ckpt = layout.detector_checkpoint(cfg.exp_dir, stage)
    if val.empty or not detector_ckpt.is_file():
        return {"measured": False, "reason": "no validation combination images" if val.empty else "no detector"}
    device, serving = evaluation_device(cfg), serving_device(cfg)
    model, labels = load_classifier(cfg, layout.classifier_checkpoint(cfg.exp_dir, stage), class_map, device)
    detector = build_detector(cfg, detector_ckpt, "torch", device=device)
    engine = TorchClassifierEngine(model, device)
    classify = lambda crops: engine.logits(normalise_batch(list(crops)))  # noqa: E731
    result = evaluate_combinations(combination_samples(val), detector, classify, labels.k_codes,
                                   cfg.classification.crop_padding, cfg.classification.image_size)
    latency = detector_model_latency(torch_raw_predictor(load_detector_checkpoint(detector_ckpt, serving)),
                                     cfg.detection.image_size)
    log.info("combination accuracy on %d val images (%s): %s; detector batch-1 p50 %.1f ms on %s", len(val),
             device_name(device), result.as_dict(), latency["p50"], device_name(serving))
    return {"measured": True, **result.as_dict(), "detector_inference_time_ms": latency["p50"],
            "latency_device": device_name(serving), "evaluation_device": device_name(device)}
