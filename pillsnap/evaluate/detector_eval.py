"""Stage-level detector results, measured on the stage's validation photos with the shared NMS/mAP code:

- the detector's targets (mAP, precision, recall) on the validation COMBINATION photos, which is what the spec
  defines them for; the same figures on validation single photos are reported apart (single_photos);
- combination accuracy (detect, crop every detection, classify every crop);
- the whole pipeline's latency (auto mode: classifier, and the detector + every crop where the photo needs it),
  batch 1 on the serving device, p95, over validation combination and single photos."""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.core import layout
from pillsnap.core.identity import file_sha256

log = logging.getLogger(__name__)
DRAWINGS = 6
SINGLE_PHOTOS_FOR_MAP = 200  # the single-photo mAP (reported apart) needs no more to be stable
LATENCY_PHOTOS = 15  # per kind (combination, single) for the whole-pipeline latency
GOOD, BAD = (40, 200, 60), (230, 40, 40)
DETECTION_KEYS = {"mAP_0.5": ("mAP_0.5", "map50"), "mAP_0.5_0.95": ("mAP_0.5_0.95", "map"),
                  "precision": ("precision",), "recall": ("recall",)}


def detection_results(train: Optional[Dict], combination: Optional[Dict] = None) -> Optional[Dict]:
    """The detector's targets in the criteria's names, measured on the validation combination photos; the single
    photos' figures and the training loop's own (mixed) validation apart; None when no detector was trained."""
    if not train:
        return None
    combination = combination or {}
    on_combos = combination.get("detector_on_combinations") or {}
    out = {name: _finite(on_combos.get(name)) for name in DETECTION_KEYS}
    out["inference_time_ms"] = combination.get("detector_inference_time_ms")
    out["not_measured"] = [k for k, v in out.items() if v is None]
    out["measured_on"] = f"{on_combos.get('n_images', 0)} validation combination photos"
    out["single_photos"] = combination.get("detector_on_singles")
    val = train.get("val_metrics") or {}
    out["training_validation"] = {name: next((val[k] for k in keys if val.get(k) is not None), None)
                                  for name, keys in DETECTION_KEYS.items()}
    out["combination"] = combination or None
    out["trained_on"] = train.get("data")
    return out


def _finite(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _detector_on(cfg: PillSnapConfig, model, rows: pd.DataFrame) -> Dict:
    """mAP, precision and recall of the detector on these photos (the shared mAP protocol)."""
    from pillsnap.infer.detection import detection_samples, evaluate_detector, map_detector

    return evaluate_detector(map_detector(model, cfg.detection.image_size), detection_samples(rows),
                             cfg.detection.conf_threshold)


def combination_accuracy(cfg: PillSnapConfig, stage: int, subset: pd.DataFrame, class_map: ClassMap) -> Dict:
    from pillsnap.core.devices import device_name, evaluation_device, serving_device
    from pillsnap.evaluate.combination import combination_samples, evaluate_combinations
    from pillsnap.infer.detection import torch_raw_predictor
    from pillsnap.infer.engines import TorchClassifierEngine, detector_engine
    from pillsnap.infer.latency import detector_model_latency, pipeline_latency
    from pillsnap.infer.preprocess import normalise_batch
    from pillsnap.models.classifier import load_classifier
    from pillsnap.models.detector import load_detector_checkpoint

    all_val = subset[subset["split"] == "val"]
    val = all_val[all_val["kind"] == "combination"]
    singles = all_val[(all_val["kind"] == "single") & all_val["boxes"].fillna("").str.len().gt(2)]  # has a box
    detector_ckpt = layout.detector_checkpoint(cfg.exp_dir, stage)
    if not detector_ckpt.is_file():
        return {"measured": False, "reason": f"no detector checkpoint {detector_ckpt}"}
    device, serving = evaluation_device(cfg), serving_device(cfg)
    latency = detector_model_latency(torch_raw_predictor(load_detector_checkpoint(detector_ckpt, serving)),
                                     cfg.detection.image_size)
    classifier_ckpt = layout.classifier_checkpoint(cfg.exp_dir, stage)
    model, labels = load_classifier(cfg, classifier_ckpt, class_map, device)
    photos = [*val["image_path"][:LATENCY_PHOTOS], *all_val[all_val["kind"] == "single"]["image_path"][:LATENCY_PHOTOS]]
    pipeline = pipeline_latency(cfg, TorchClassifierEngine(copy.deepcopy(model), serving), labels, photos, "auto",
                                lambda: detector_engine(cfg, detector_ckpt, "torch", device=serving))
    det_model = load_detector_checkpoint(detector_ckpt, device)
    timing = {"models": {"detector": file_sha256(detector_ckpt), "classifier": file_sha256(classifier_ckpt)},
              "detector_inference_time_ms": latency["p50"], "latency_device": device_name(serving),
              "evaluation_device": device_name(device), "pipeline_latency": pipeline,
              "detector_on_singles": _detector_on(cfg, det_model, singles[:SINGLE_PHOTOS_FOR_MAP])
              if len(singles) else None}
    if val.empty:
        return {"measured": False, "reason": "no validation combination photos", **timing}
    timing["detector_on_combinations"] = _detector_on(cfg, det_model, val)
    detector = detector_engine(cfg, detector_ckpt, "torch", device=device)
    engine = TorchClassifierEngine(model, device)
    classify = lambda crops: engine.logits(normalise_batch(list(crops)))  # noqa: E731
    drawn = Drawings(layout.reports_dir(cfg.exp_dir, stage) / "detections")
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
