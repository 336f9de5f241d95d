"""Classification metrics from logits: accuracy, macro-F1, top-5, per-class F1 and top-1 (worst classes named)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, class_names: Optional[Sequence[str]] = None,
                           worst: int = 5) -> Dict:
    y_true = np.asarray(y_true)
    n = int(len(y_true))
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "top5": None}
    y_pred = logits.argmax(1)
    k = min(5, logits.shape[1])
    topk = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    present = np.unique(y_true)  # F1 over classes that have validation samples
    per_class = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    per_class_top1 = [float((y_pred[y_true == c] == c).mean()) for c in present]
    order = np.argsort(per_class)[:worst]
    name = (lambda c: class_names[c]) if class_names is not None else str
    return {
        "n": n,
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(per_class.mean()),
        "top5": float((topk == y_true[:, None]).any(1).mean()),
        "per_class_f1_min": float(per_class.min()),
        "per_class_min_top1": min(per_class_top1),  # the worst class's top-1 accuracy (its recall)
        "worst_classes": [{"class": name(int(present[i])), "f1": float(per_class[i])} for i in order],
        "classes_evaluated": int(len(present)),
    }



def class_coverage(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, min_recall: float) -> Dict:
    """The share of all `num_classes` classes whose recall reaches `min_recall`; a class without a validation
    sample has no measured recall and is not covered."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    hits = np.bincount(y_true[y_pred == y_true], minlength=num_classes)[:num_classes]
    support = np.bincount(y_true, minlength=num_classes)[:num_classes]
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    covered = int(((support > 0) & (recall >= min_recall)).sum())
    return {"class_coverage": covered / max(1, num_classes), "classes_covered": covered,
            "classes_without_val": int((support == 0).sum()), "coverage_min_recall": min_recall}
