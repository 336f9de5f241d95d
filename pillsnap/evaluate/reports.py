"""D-9 report files: metrics.json (per-epoch history + latest), confusion-pair analysis, hard cases (JSONL).

Every JSON file is written to a temp file in the same folder and moved into place with os.replace, so a
reader (TensorBoard-side script, Prefect artifact, a crash mid-write) never sees half a file.
Non-finite floats are written as null: the files stay standard JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

PathLike = Union[str, Path]
MODES_USED = ("single", "combo")


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, dataclasses; NaN/inf become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(data), indent=2, ensure_ascii=False, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_epoch_metrics(
    path: PathLike,
    epoch: int,
    metrics: Mapping[str, Any],
    monitor: Optional[str] = None,
    mode: str = "max",
) -> Dict[str, Any]:
    """Add one epoch to metrics.json: {"history": [...], "latest": {...}, "best": {...} | None}.

    Re-writing an epoch that is already there (a resumed run) replaces it instead of duplicating it.
    With `monitor`, "best" is the history entry with the best value of that metric (`mode` max|min).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} is not one of ['max', 'min']")
    if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
        raise ValueError(f"epoch={epoch!r} must be a non-negative int")
    path = Path(path)
    doc = read_json(path) if path.is_file() else {"history": []}
    entry = {"epoch": int(epoch), **to_jsonable(dict(metrics))}
    history = [h for h in doc.get("history", []) if h.get("epoch") != entry["epoch"]] + [entry]
    history.sort(key=lambda h: h["epoch"])
    doc = {
        "history": history,
        "latest": history[-1],
        "best": _best_entry(history, monitor, mode) if monitor else doc.get("best"),
        "monitor": monitor or doc.get("monitor"),
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(path, doc)
    return doc


def _best_entry(history: Sequence[Mapping[str, Any]], monitor: str, mode: str) -> Optional[Dict[str, Any]]:
    scored = [h for h in history if isinstance(h.get(monitor), (int, float)) and not isinstance(h.get(monitor), bool)]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return dict(pick(scored, key=lambda h: h[monitor]))


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


@dataclass(frozen=True)
class HardCase:
    """One misclassified or low-confidence prediction kept for the weekly analysis (D-9)."""

    image_path: str
    true_kcode: str
    pred_kcode: str
    mode_used: str  # single | combo: what the pipeline actually ran
    gating_score: Optional[float] = None
    single_confidence: Optional[float] = None
    fallback_reason: Optional[str] = None  # why auto mode fell back to combo, if it did
    thumbnail_path: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode_used not in MODES_USED:
            raise ValueError(f"HardCase.mode_used={self.mode_used!r} is not one of {list(MODES_USED)}")
        conf = self.single_confidence
        if conf is not None and not 0.0 <= conf <= 1.0:
            raise ValueError(f"HardCase.single_confidence={conf!r} must be in [0, 1]")


def write_hard_cases(path: PathLike, cases: Iterable[HardCase], append: bool = False) -> int:
    """Write (or append) one JSON object per line; returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(to_jsonable(c), ensure_ascii=False, allow_nan=False) for c in cases]
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return len(lines)


def read_hard_cases(path: PathLike) -> List[Dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
