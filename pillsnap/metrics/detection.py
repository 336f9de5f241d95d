"""Detection metrics, single class: greedy matching at IoU 0.50:0.95, 101-point interpolated AP (COCO),
precision / recall at the confidence that maximises the smoothed F1 (ultralytics' ap_per_class).

A metric that could not be measured (no ground-truth boxes) is NaN and named in `not_measured`, never None.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)

def match_detections(pred: np.ndarray, gt: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(K, T) correct flags: predictions best-first each claim the best unclaimed target per IoU threshold."""
    correct = np.zeros((len(pred), len(thresholds)), dtype=bool)
    if not len(pred) or not len(gt):
        return correct
    iou = box_iou(gt, pred[:, :4])
    matched = np.zeros((len(gt), len(thresholds)), dtype=bool)
    for j in np.flatnonzero((iou >= thresholds.min()).any(0)):
        available = np.where(matched, 0.0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, range(len(thresholds))] >= thresholds
        matched[k, range(len(thresholds))] |= correct[j]
    return correct

def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, 101-point interpolation (COCO), integrated like ultralytics."""
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 1.0], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    x = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x))

def _smooth(y: np.ndarray, f: float = 0.1) -> np.ndarray:
    nf = round(len(y) * f * 2) // 2 + 1
    p = np.ones(nf // 2)
    return np.convolve(np.concatenate((p * y[0], y, p * y[-1])), np.ones(nf) / nf, mode="valid")

def detection_metrics(tp: np.ndarray, conf: np.ndarray, n_gt: int, conf_threshold: Optional[float] = None) -> Dict:
    """mAP@0.5, mAP@0.5:0.95, precision and recall (IoU 0.5, at the max-F1 confidence), single class."""
    out: Dict = {"n_gt": int(n_gt), "n_pred": int(len(conf)), "not_measured": []}
    if n_gt == 0:
        for key in ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall"):
            out[key] = float("nan")
        out["not_measured"] = ["mAP_0.5", "mAP_0.5_0.95", "precision", "recall"]
        return out
    order = np.argsort(-conf, kind="stable")
    tp, conf = tp[order].astype(np.float64), conf[order]
    if not len(conf):
        return {**out, "mAP_0.5": 0.0, "mAP_0.5_0.95": 0.0, "precision": 0.0, "recall": 0.0}
    tpc, fpc = tp.cumsum(0), (1 - tp).cumsum(0)
    recall, precision = tpc / (n_gt + 1e-16), tpc / (tpc + fpc)
    ap = np.array([average_precision(recall[:, t], precision[:, t]) for t in range(tp.shape[1])])
    x = np.linspace(0, 1, 1000)
    p_curve = np.interp(-x, -conf, precision[:, 0], left=1)
    r_curve = np.interp(-x, -conf, recall[:, 0], left=0)
    i = _smooth(2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)).argmax()
    out.update({"mAP_0.5": float(ap[0]), "mAP_0.5_0.95": float(ap.mean()), "precision": float(p_curve[i]),
                "recall": float(r_curve[i]), "f1_confidence": float(x[i])})
    if conf_threshold is not None:  # the serving operating point, for reports
        sel = conf >= conf_threshold
        hits = float(tp[sel, 0].sum())
        out["precision_at_conf"] = hits / sel.sum() if sel.any() else 0.0
        out["recall_at_conf"] = hits / n_gt
    return out
