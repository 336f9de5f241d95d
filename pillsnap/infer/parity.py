"""Torch vs ONNX parity on REAL validation images of the stage subset (never the test split).

Classifier: the same normalised crops through both engines -> max |Δlogit| and top-1 agreement.
Detector:  both raw heads through the SAME letterbox, NMS and mAP code (`pillsnap.infer.detection`) ->
           mAP@0.5 of each and their difference, plus the max |Δ| of the raw head output on one batch.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch

from pillsnap.data.manifest import boxes_of
from pillsnap.infer.detection import (detection_samples, evaluate_detector, letterbox, load_bgr, map_detector, onnx_raw_predictor, torch_raw_predictor)
from pillsnap.infer.engines import OnnxClassifierEngine, TorchClassifierEngine
from pillsnap.infer.preprocess import classifier_inputs, load_rgb

log = logging.getLogger(__name__)


@dataclass
class ClassifierParity:
    samples: int
    max_abs_logit_diff: float
    top1_agreement: float
    min_top1_agreement: float
    passed: bool

    def as_dict(self) -> Dict:
        return asdict(self)


@dataclass
class DetectorParity:
    samples: int
    gt_boxes: int
    map50_torch: float
    map50_onnx: float
    map50_diff: float
    max_map_diff: float
    max_abs_raw_diff: float
    passed: bool

    def as_dict(self) -> Dict:
        return asdict(self)


def classifier_parity_images(subset: pd.DataFrame, n: int) -> List[str]:
    """Up to n single-pill validation photos of the stage subset, in a fixed order."""
    rows = subset[(subset["split"] == "val") & (subset["kind"] == "single")].sort_values("image_id")
    return list(rows["image_path"][:n])


def detector_parity_rows(subset: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to n validation photos with boxes: combination photos first (what the detector serves), then singles."""
    val = subset[subset["split"] == "val"]
    with_boxes = val[[len(boxes_of(r)) > 0 for _, r in val.iterrows()]] if len(val) else val
    order = with_boxes.assign(_combo=with_boxes["kind"] != "combination").sort_values(["_combo", "image_id"])
    return order.drop(columns="_combo").head(n)


def check_classifier_parity(torch_engine: TorchClassifierEngine, onnx_path: Path, image_paths: List[str],
                            image_size: int, min_top1_agreement: float, batch_size: int = 16,
                            device: Optional[torch.device] = None) -> ClassifierParity:
    """Both engines batched on the evaluation device (ONNX Runtime with its CUDA provider when there is one)."""
    if not image_paths:
        raise ValueError("classifier parity: the stage subset has no validation images to compare on")
    onnx_engine = OnnxClassifierEngine(onnx_path, device=device or torch.device("cpu"))
    diffs, agree = [], 0
    for start in range(0, len(image_paths), batch_size):
        batch = np.concatenate([classifier_inputs(load_rgb(p), [None], image_size, 0.0)
                                for p in image_paths[start:start + batch_size]])
        a, b = torch_engine.logits(batch), onnx_engine.logits(batch)
        diffs.append(float(np.abs(a - b).max()) if np.isfinite(b).all() else float("inf"))
        agree += int((a.argmax(1) == b.argmax(1)).sum())
    agreement = agree / len(image_paths)
    max_diff = max(diffs)
    passed = agreement >= min_top1_agreement and np.isfinite(max_diff)
    return ClassifierParity(len(image_paths), max_diff, agreement, min_top1_agreement, bool(passed))


def check_detector_parity(model, onnx_path: Path, rows: pd.DataFrame, image_size: int,
                          max_map_diff: float, device: Optional[torch.device] = None) -> DetectorParity:
    if rows.empty:
        raise ValueError("detector parity: the stage subset has no validation images with boxes to compare on")
    from pillsnap.infer.engines import onnx_providers

    device = device or torch.device("cpu")
    samples = detection_samples(rows)
    onnx_raw = onnx_raw_predictor(onnx_path, onnx_providers(device))
    torch_raw = torch_raw_predictor(model, device)
    on_torch = evaluate_detector(map_detector(torch_raw, image_size), samples)
    on_onnx = evaluate_detector(map_detector(onnx_raw, image_size), samples)
    first = np.stack([letterbox(load_bgr(s.image_path), image_size)[0] for s in samples[:8]])
    raw_diff = float(np.abs(torch_raw(first) - onnx_raw(first)).max())
    a, b = float(on_torch["mAP_0.5"]), float(on_onnx["mAP_0.5"])
    diff = abs(a - b)
    passed = np.isfinite(diff) and diff <= max_map_diff
    return DetectorParity(len(samples), int(on_torch["n_gt"]), a, b, diff, max_map_diff, raw_diff, bool(passed))
