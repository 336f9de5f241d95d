"""Stage-level detector results: the detector's validation metrics and combination accuracy on the stage's
validation combination images (detect, crop every detection, classify every crop)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.core import layout

log = logging.getLogger(__name__)
DRAWINGS = 6
GOOD, BAD = (40, 200, 60), (230, 40, 40)
DETECTION_KEYS = {"mAP_0.5": ("mAP_0.5", "map50"), "mAP_0.5_0.95": ("mAP_0.5_0.95", "map"),
                  "precision": ("precision",), "recall": ("recall",)}


def detection_results(train: Optional[Dict], combination: Optional[Dict] = None) -> Optional[Dict]:
    """The detector's validation metrics in the criteria's names, its batch-1 latency and the combination results
    (detect, crop, classify), or None when no detector was trained."""
    if not train:
        return None
    val = train.get("val_metrics") or {}
    out = {name: next((val[k] for k in keys if val.get(k) is not None), None) for name, keys in DETECTION_KEYS.items()}
    out["inference_time_ms"] = (combination or {}).get("detector_inference_time_ms")
    out["not_measured"] = [k for k, v in out.items() if v is None]
    out["combination"] = combination
    out["trained_on"] = train.get("data")
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
    if not detector_ckpt.is_file():
        return {"measured": False, "reason": f"no detector checkpoint {detector_ckpt}"}
    device, serving = evaluation_device(cfg), serving_device(cfg)
    latency = detector_model_latency(torch_raw_predictor(load_detector_checkpoint(detector_ckpt, serving)),
                                     cfg.detection.image_size)
    timing = {"detector_inference_time_ms": latency["p50"], "latency_device": device_name(serving),
              "evaluation_device": device_name(device)}
    if val.empty:
        return {"measured": False, "reason": "no validation combination photos", **timing}
    model, labels = load_classifier(cfg, layout.classifier_checkpoint(cfg.exp_dir, stage), class_map, device)
    detector = build_detector(cfg, detector_ckpt, "torch", device=device)
    engine = TorchClassifierEngine(model, device)
    classify = lambda crops: engine.logits(normalise_batch(list(crops)))  # noqa: E731
    drawn = Drawings(layout.stage_dir(cfg.exp_dir, stage) / "reports" / "detections")
    result = evaluate_combinations(combination_samples(val), detector, classify, labels.k_codes,
                                   cfg.classification.crop_padding, cfg.classification.image_size, on_image=drawn)
    log.info("combination accuracy on %d val images (%s): %s; detector batch-1 p50 %.1f ms on %s", len(val),
             device_name(device), result.as_dict(), latency["p50"], device_name(serving))
    return {"measured": True, **result.as_dict(), **timing, "drawings": [str(p) for p in drawn.paths]}


class Drawings:
    """The first `limit` combination photos drawn: each detection with its predicted K-code (green when right, red
    when wrong), the ground truth in thin white."""

    def __init__(self, out_dir: Path, limit: int = DRAWINGS):
        self.out_dir, self.limit, self.paths = Path(out_dir), limit, []

    def __call__(self, sample, dets, predicted, right) -> None:
        from pillsnap.evaluate.plots import draw_detections

        if len(self.paths) >= self.limit:
            return
        boxes = [{"xyxy": d[:4].tolist(), "label": k, "score": float(d[4]), "color": GOOD if ok else BAD}
                 for d, k, ok in zip(dets, predicted, right)]
        truth = [{"xyxy": b.tolist()} for b in sample.boxes]
        self.paths.append(draw_detections(sample.image_path, boxes,
                                          self.out_dir / f"detections_{len(self.paths):03d}.png", truth))


def detector_answers(cfg: PillSnapConfig, stage: int, photo: Optional[str]) -> Dict:
    """detection_model_loading: the best detector checkpoint loads and gives a finite raw output for a photo."""
    import numpy as np

    from pillsnap.core.devices import evaluation_device
    from pillsnap.infer.detection import letterbox, load_bgr, torch_raw_predictor
    from pillsnap.models.detector import load_detector_checkpoint

    path = layout.detector_checkpoint(cfg.exp_dir, stage)
    out: Dict = {"checkpoint": str(path), "photo": photo, "loaded": False, "output_finite": False}
    if photo is None:
        return {**out, "error": "no validation photo to run it on"}
    try:
        model = load_detector_checkpoint(path, evaluation_device(cfg))
        out["loaded"] = True
        raw = torch_raw_predictor(model)(letterbox(load_bgr(photo), cfg.detection.image_size)[0][None])
        out.update(output_finite=bool(np.isfinite(raw).all()), output_shape=list(raw.shape))
    except Exception as e:  # noqa: BLE001 - the check's verdict names the failure
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out
