"""Combination accuracy of the two-stage pipeline: detect every pill, classify EVERY crop, match to the truth.

Per combination image: detections (serving thresholds) -> one padded crop per detection, cut exactly like the
classifier's training crops (classification.crop_padding) -> the classifier on the batch of all crops -> greedy
matching of detections (best confidence first) to ground-truth boxes at IoU >= 0.5.

Reported: detection recall and precision over ALL pills (the detector has one class, "pill"); per-pill accuracy
(correct pills / pills in the stage's label space; a missed pill is wrong), accuracy on the detected pills
(separates classifier from detector errors) and the whole-image rate where the reported pill list is exactly
right (every pill found and named correctly, nothing extra; over photos whose pills are all in the label space).
A pill whose K-code is outside the classifier's label space (a combination from classes a later stage adds) is
counted as out of scope, never as a classification error. The earlier
implementation classified only the first detection; here the number of classified crops is checked against the
number of detections for every image and a mismatch is an error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pillsnap.data.manifest import boxes_of
from pillsnap.infer.preprocess import CropCountError, crop_detections
from pillsnap.metrics.detection import box_iou
from pillsnap.infer.detection import load_bgr

Classify = Callable[[np.ndarray], np.ndarray]  # (K, S, S, 3) uint8 RGB crops -> (K, num_classes) logits
Detect = Callable[[Sequence[np.ndarray]], List[np.ndarray]]  # BGR images -> per image (k, 6) xyxy, conf, class
MATCH_IOU = 0.5


@dataclass(frozen=True)
class ComboSample:
    image_path: str
    boxes: np.ndarray  # (M, 4) xyxy pixels
    k_codes: List[str]  # one per box


@dataclass
class CombinationResult:
    images: int
    pills: int
    detections: int
    crops_classified: int
    matched: int
    correct: int
    images_all_right: int
    pills_in_scope: int
    pills_out_of_scope: int
    images_in_scope: int
    per_pill_accuracy: float
    detection_recall: float
    detection_precision: float
    accuracy_on_detected: float
    all_pills_right_rate: float

    def as_dict(self) -> Dict:
        return asdict(self)


def combination_samples(rows: pd.DataFrame) -> List[ComboSample]:
    samples = []
    for _, row in rows[rows["kind"] == "combination"].iterrows():
        boxes = boxes_of(row)
        xyxy = np.array([b["bbox"] for b in boxes], dtype=np.float64).reshape(-1, 4)
        xyxy[:, 2:] += xyxy[:, :2]
        samples.append(ComboSample(str(row["image_path"]), xyxy, [b["k_code"] for b in boxes]))
    return samples


def greedy_match(det_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = MATCH_IOU) -> np.ndarray:
    """For each detection (in the given best-first order) the index of its ground-truth box, or -1."""
    match = np.full(len(det_boxes), -1, dtype=np.int64)
    if not len(det_boxes) or not len(gt_boxes):
        return match
    iou = box_iou(det_boxes[:, :4], gt_boxes)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for i in range(len(det_boxes)):
        candidates = np.where(taken, -1.0, iou[i])
        j = int(candidates.argmax())
        if candidates[j] >= iou_threshold:
            match[i], taken[j] = j, True
    return match


def classify_every_crop(image_bgr: np.ndarray, dets: np.ndarray, classify: Classify, padding: float,
                        crop_size: int) -> np.ndarray:
    """Predicted class index for EVERY detection of one image."""
    if not len(dets):
        return np.zeros(0, dtype=np.int64)
    crops = crop_detections(image_bgr[:, :, ::-1].copy(), dets, padding, crop_size)
    logits = np.asarray(classify(crops))
    if len(crops) != len(dets) or logits.ndim != 2 or len(logits) != len(dets):
        raise CropCountError(f"{len(dets)} detections but {len(crops)} crops and {len(logits)} predictions: "
                             "every detected pill must be classified")
    return logits.argmax(1)


Seen = Callable[[ComboSample, np.ndarray, List[str], np.ndarray], None]  # (sample, dets, predicted K-codes, right)


def evaluate_combinations(samples: Sequence[ComboSample], detect: Detect, classify: Classify, k_codes: Sequence[str],
                          padding: float, crop_size: int, batch_images: int = 8,
                          on_image: Optional[Seen] = None) -> CombinationResult:
    """`k_codes[i]` is the K-code of classifier output i (the stage's label space); `on_image` sees every image's
    detections (sorted by confidence), their predicted K-codes and which of them are right (for drawings)."""
    totals = dict(images=0, pills=0, detections=0, crops=0, matched=0, correct=0, all_right=0, in_scope=0,
                  images_in_scope=0, matched_in_scope=0)
    known = set(k_codes)
    for start in range(0, len(samples), batch_images):
        chunk = samples[start:start + batch_images]
        images = [load_bgr(s.image_path) for s in chunk]
        for sample, image, dets in zip(chunk, images, detect(images)):
            dets = dets[np.argsort(-dets[:, 4], kind="stable")] if len(dets) else dets
            predicted = classify_every_crop(image, dets, classify, padding, crop_size)
            match = greedy_match(dets, sample.boxes)
            right = [m >= 0 and k_codes[p] == sample.k_codes[m] for p, m in zip(predicted, match)]
            in_scope = sum(k in known for k in sample.k_codes)
            totals["images"] += 1
            totals["pills"] += len(sample.boxes)
            totals["in_scope"] += in_scope
            totals["detections"] += len(dets)
            totals["crops"] += len(predicted)
            totals["matched"] += int((match >= 0).sum())
            totals["matched_in_scope"] += sum(m >= 0 and sample.k_codes[m] in known for m in match)
            totals["correct"] += int(sum(right))
            if on_image is not None:
                on_image(sample, dets, [k_codes[p] for p in predicted], np.array(right, bool))
            if in_scope == len(sample.k_codes):
                totals["images_in_scope"] += 1
                totals["all_right"] += int(sum(right) == len(sample.boxes) == len(dets))
    return _summarise(totals)


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def _summarise(t: Dict[str, int]) -> CombinationResult:
    if t["crops"] != t["detections"]:
        raise CropCountError(f"classified {t['crops']} crops for {t['detections']} detections")
    return CombinationResult(
        images=t["images"], pills=t["pills"], detections=t["detections"], crops_classified=t["crops"],
        matched=t["matched"], correct=t["correct"], images_all_right=t["all_right"], pills_in_scope=t["in_scope"],
        pills_out_of_scope=t["pills"] - t["in_scope"], images_in_scope=t["images_in_scope"],
        per_pill_accuracy=_ratio(t["correct"], t["in_scope"]), detection_recall=_ratio(t["matched"], t["pills"]),
        detection_precision=_ratio(t["matched"], t["detections"]),
        accuracy_on_detected=_ratio(t["correct"], t["matched_in_scope"]),
        all_pills_right_rate=_ratio(t["all_right"], t["images_in_scope"]))


def torch_classifier(model, device: Optional[str] = None) -> Classify:
    """A Classify callable from a torch classifier: ImageNet normalisation as in training, logits out."""
    import torch

    from pillsnap.data.datasets import MEAN, STD

    model = (model.to(device) if device else model).eval()
    device = next(model.parameters()).device
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def classify(crops: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(crops).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return model((x - mean) / std).float().cpu().numpy()

    return classify
