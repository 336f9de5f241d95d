"""Classification metrics from logits: accuracy, macro-F1, top-5, per-class F1 and top-1 (worst classes named)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, class_names: Optional[Sequence[str]] = None,
                           worst: int = 5) -> Dict:
    return metrics_from_top(y_true, top_predictions(logits), class_names, worst)


def top_predictions(logits: np.ndarray) -> np.ndarray:
    """n × k class indices (k = 5, or the class count), best first (ties: the lower class index, as argmax).
    What the metrics need of the logits: ranks that validate apart gather these, not n × classes floats."""
    k = min(5, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    scores = np.take_along_axis(logits, top, axis=1)
    return np.take_along_axis(top, np.lexsort((top, -scores), axis=-1), axis=1)


def metrics_from_top(y_true: np.ndarray, top: np.ndarray, class_names: Optional[Sequence[str]] = None,
                     worst: int = 5) -> Dict:
    y_true = np.asarray(y_true)
    n = int(len(y_true))
    if n == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "top5": None}
    y_pred = top[:, 0]
    present = np.unique(y_true)  # F1 over classes that have validation samples
    per_class = f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    per_class_top1 = [float((y_pred[y_true == c] == c).mean()) for c in present]
    order = np.argsort(per_class)[:worst]
    name = (lambda c: class_names[c]) if class_names is not None else str
    return {
        "n": n,
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(per_class.mean()),
        "top5": float((top == y_true[:, None]).any(1).mean()),
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


def most_confused_pairs(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Optional[Sequence[str]] = None,
    top_n: int = 20,
) -> List[Dict[str, Any]]:
    """The top_n unordered class pairs by mistakes either way, without building an N×N matrix.

    Each row: class_a, class_b (names), index_a, index_b, a_as_b, b_as_a, total, and the share of each class's
    samples lost to the other (rate_a_as_b, rate_b_as_a) so a pair of rare classes is not hidden by counts alone.
    """
    t, p = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    wrong = t != p
    if not wrong.any():
        return []
    width = int(max(t.max(), p.max())) + 1
    codes, counts = np.unique(t[wrong].astype(np.int64) * width + p[wrong], return_counts=True)
    directed = {(int(c // width), int(c % width)): int(n) for c, n in zip(codes, counts)}
    support = np.bincount(t, minlength=width)
    pairs: Dict[tuple, Dict[str, Any]] = {}
    for (a, b), n in directed.items():
        lo, hi = min(a, b), max(a, b)
        row = pairs.setdefault((lo, hi), {"index_a": lo, "index_b": hi, "a_as_b": 0, "b_as_a": 0})
        row["a_as_b" if a == lo else "b_as_a"] += n
    rows = []
    for row in pairs.values():
        a, b = row["index_a"], row["index_b"]
        row.update(
            class_a=_name(a, class_names), class_b=_name(b, class_names), total=row["a_as_b"] + row["b_as_a"],
            rate_a_as_b=row["a_as_b"] / support[a] if support[a] else 0.0,
            rate_b_as_a=row["b_as_a"] / support[b] if support[b] else 0.0,
        )
        rows.append(row)
    rows.sort(key=lambda r: (-r["total"], r["index_a"], r["index_b"]))
    return rows[:top_n]


def _as_labels(values: Sequence[int], name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a 1-D sequence of integer class indices, got shape {arr.shape} {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} has a negative class index {int(arr.min())}")
    return arr.astype(np.int64)


def _name(index: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is None:
        return str(index)
    if index >= len(class_names):
        raise ValueError(f"class index {index} is outside class_names (len {len(class_names)})")
    return str(class_names[index])
