"""Typed stage results for the evaluation tests: only what a test sets is measured, the rest is None."""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

from pillsnap.evaluate.results import (ApiResults, ClassifierResults, DataResults, DetectorResults, StageResults,
                                       Status, TrainingResults)


def results(stage: int = 1, checks: Optional[Dict[str, str]] = None, detector: Optional[Dict] = None,
            api: Optional[Dict] = None, training: Optional[Dict] = None, data: Optional[Dict] = None,
            **classifier) -> StageResults:
    return StageResults(stage, ClassifierResults(**classifier),
                        DetectorResults(**detector) if detector is not None else None,
                        ApiResults(**api) if api is not None else None, TrainingResults(**(training or {})),
                        DataResults(**(data or {})), {k: Status(v) for k, v in (checks or {}).items()})


def measuring(values: Dict[str, float], stage: int = 1, checks: Optional[Dict[str, str]] = None) -> StageResults:
    """Typed results in which each named target measurement (METRICS' names) has the given value."""
    from pillsnap.evaluate.results import METRICS

    sections: Dict[str, Dict] = {}
    top: Dict[str, float] = {}
    for name, value in values.items():
        path = METRICS[name]
        if len(path) == 1:
            top[path[0]] = value
        else:
            sections.setdefault(path[0], {})[path[1]] = value
    measured = results(stage, checks, sections.get("detector"), sections.get("api"), sections.get("training"),
                       sections.get("data"), **sections.get("classifier", {}))
    return replace(measured, **top)
