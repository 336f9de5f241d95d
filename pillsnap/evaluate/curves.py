"""Macro one-vs-rest ROC and PR curves for many classes (D-9).

sklearn's multi-class roc_auc_score refuses a validation split in which some classes have no sample, which
is normal with thousands of classes; so each class is scored one-vs-rest on its own, classes without both
positives and negatives are skipped (and counted), and the macro numbers average the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

GRID_POINTS = 201


@dataclass
class MacroCurves:
    grid: np.ndarray  # FPR grid for ROC, recall grid for PR
    mean_tpr: np.ndarray
    mean_precision: np.ndarray  # interpolated: best precision at recall >= r, averaged over classes
    macro_roc_auc: Optional[float]
    macro_average_precision: Optional[float]
    classes_evaluated: int
    classes_skipped: List[int] = field(default_factory=list)  # no positive (or no negative) sample
    per_class_roc_auc: Dict[int, float] = field(default_factory=dict)
    per_class_ap: Dict[int, float] = field(default_factory=dict)


def _check_inputs(y_true: Sequence[int], y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(y_true)
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2:
        raise ValueError(f"y_prob must be 2-D (samples, classes), got shape {prob.shape}")
    if labels.ndim != 1 or labels.shape[0] != prob.shape[0]:
        raise ValueError(f"y_true must be 1-D with {prob.shape[0]} labels (rows of y_prob), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= prob.shape[1]):
        raise ValueError(f"y_true holds class indices outside [0, {prob.shape[1]}) (y_prob has {prob.shape[1]} columns)")
    return labels.astype(np.int64), prob


def _interpolated_precision(recall: np.ndarray, precision: np.ndarray, grid: np.ndarray) -> np.ndarray:
    order = np.argsort(recall, kind="stable")
    r, p = recall[order], precision[order]
    best_from_here = np.maximum.accumulate(p[::-1])[::-1]  # best precision at recall >= r[i]
    idx = np.searchsorted(r, grid, side="left")
    return np.where(idx < r.size, best_from_here[np.minimum(idx, r.size - 1)], 0.0)


def macro_ovr_curves(y_true: Sequence[int], y_prob: np.ndarray) -> MacroCurves:
    labels, prob = _check_inputs(y_true, y_prob)
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    tpr_sum, prec_sum = np.zeros_like(grid), np.zeros_like(grid)
    result = MacroCurves(grid, tpr_sum, prec_sum, None, None, 0)
    for c in range(prob.shape[1]):
        positives = labels == c
        n_pos = int(positives.sum())
        if n_pos == 0 or n_pos == labels.size:
            result.classes_skipped.append(c)
            continue
        fpr, tpr, _ = roc_curve(positives, prob[:, c])
        precision, recall, _ = precision_recall_curve(positives, prob[:, c])
        tpr_sum += np.interp(grid, fpr, tpr)
        prec_sum += _interpolated_precision(recall, precision, grid)
        result.per_class_roc_auc[c] = float(auc(fpr, tpr))
        result.per_class_ap[c] = float(average_precision_score(positives, prob[:, c]))
    n = len(result.per_class_roc_auc)
    result.classes_evaluated = n
    if n:
        result.mean_tpr, result.mean_precision = tpr_sum / n, prec_sum / n
        result.mean_tpr[0] = 0.0
        result.macro_roc_auc = float(np.mean(list(result.per_class_roc_auc.values())))
        result.macro_average_precision = float(np.mean(list(result.per_class_ap.values())))
    return result


def curves_summary(curves: MacroCurves, class_names: Optional[Sequence[str]] = None, worst_n: int = 20) -> Dict:
    """The AUC numbers for JSON: macro values, counts, and the classes with the lowest average precision."""
    def name(c: int) -> str:
        return str(class_names[c]) if class_names is not None else str(c)

    worst = sorted(curves.per_class_ap.items(), key=lambda kv: (kv[1], kv[0]))[:worst_n]
    return {
        "method": "macro one-vs-rest",
        "macro_roc_auc": curves.macro_roc_auc,
        "macro_average_precision": curves.macro_average_precision,
        "classes_evaluated": curves.classes_evaluated,
        "classes_skipped": len(curves.classes_skipped),
        "worst_classes_by_ap": [
            {"class": name(c), "average_precision": ap, "roc_auc": curves.per_class_roc_auc[c]} for c, ap in worst
        ],
    }
