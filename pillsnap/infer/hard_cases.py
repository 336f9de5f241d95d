"""D-3 hard cases: photos the serving pipeline was unsure about, kept as JSONL for the weekly analysis."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from pillsnap.core.jsonio import PathLike, to_jsonable

MODES_USED = ("single", "combo")


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

