"""D-14 stage criteria: mandatory checks, performance targets, and the performance score.

The tables live in the config (`evaluation.stages[n]`), so this module holds only the rules.

Results layout: a dict, nested by group, e.g.
    {"mandatory_checks": {"pipeline_complete": "pass", ...},   (statuses from pillsnap.evaluate.checks)
     "detection": {"mAP_0.5": 0.41, "mAP_0.5_0.95": 0.22, "precision": 0.5, "recall": 0.4, "inference_time_ms": 31},
     "classification": {"accuracy": 0.7, "macro_f1": 0.6, "top5": 0.9, "per_class_f1_min": 0.2, ...},
     "system": {"gpu_memory_gb": 11.2, "data_loading_s": 0.8, "data_time_s": 0.02, "compute_time_s": 0.11},
     "optimization": {...}, "scalability": {...}, "production": {...}, "advanced": {...}}
A target's `metric` is a dotted path into it ("detection.mAP_0.5"); a flat key spelled the same way works too.
The "classification" group is what `pillsnap.metrics.classification.classification_metrics` returns.

Performance score (one number per stage, 0..1): the mean, over ALL the stage's targets, of
    min(measured / target, 1)   for ">=" targets (higher is better)
    min(target / measured, 1)   for "<=" targets (lower is better)
    0                           for a target that was not measured (or is NaN)
so 1.0 means every target was measured and met; a target nobody measured never raises the score. A target the
configuration rules out (`ruled_out` prefixes: the detector's with detection.enabled=false) is "not_applicable":
named in the report and left out of the mean. The report states how many targets were measured; when none was,
the score is None (callers must not read that as a pass).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from pillsnap.config import ConfigError, EvaluationConfig, RecommendationThresholds, StageCriteria, TargetSpec

GE, LE = ">=", "<="
MET, NOT_MET, NOT_MEASURED = "met", "not_met", "not_measured"
PASSED, FAILED, UNATTESTED, NOT_APPLICABLE = "passed", "failed", "unattested", "not_applicable"
# A check's status (pillsnap.evaluate.checks) -> its verdict here. "unattested" (an attested check no named person
# confirmed) blocks like a failure; "not_applicable" (ruled out by the configuration) neither passes nor blocks.
CHECK_STATUS = {"pass": PASSED, "attested": PASSED, "fail": FAILED, "not_measured": NOT_MEASURED,
                "unattested": UNATTESTED, "not_applicable": NOT_APPLICABLE}
RECOMMEND_PROCEED, SUGGEST_OPTIMIZE, WARN_STOP = "RECOMMEND_PROCEED", "SUGGEST_OPTIMIZE", "WARN_STOP"

_ABSENT = object()


@dataclass(frozen=True)
class TargetResult:
    metric: str
    op: str
    target: float
    measured: Optional[float]
    status: str  # met | not_met | not_measured | not_applicable
    score: Optional[float]  # contribution to the performance score; None when not measured or not applicable


@dataclass(frozen=True)
class MandatoryResult:
    name: str
    status: str  # passed | failed | not_measured | unattested | not_applicable


@dataclass(frozen=True)
class CriteriaReport:
    stage: int
    mandatory: List[MandatoryResult]
    targets: List[TargetResult]
    advanced: List[TargetResult]  # reported only; not part of the score
    performance_score: Optional[float]

    @property
    def mandatory_passed(self) -> bool:
        return not self.failed_mandatory

    @property
    def failed_mandatory(self) -> List[str]:
        return [m.name for m in self.mandatory if m.status in (FAILED, NOT_MEASURED, UNATTESTED)]

    @property
    def unattested(self) -> List[str]:
        return [m.name for m in self.mandatory if m.status == UNATTESTED]

    @property
    def not_applicable(self) -> List[str]:
        return [m.name for m in self.mandatory if m.status == NOT_APPLICABLE] + \
            [t.metric for t in self.targets if t.status == NOT_APPLICABLE]

    @property
    def targets_measured(self) -> int:
        return sum(t.status not in (NOT_MEASURED, NOT_APPLICABLE) for t in self.targets)

    @property
    def all_targets_met(self) -> bool:
        return all(t.status in (MET, NOT_APPLICABLE) for t in self.targets)

    @property
    def not_measured(self) -> List[str]:
        checks = [m.name for m in self.mandatory if m.status == NOT_MEASURED]
        return checks + [t.metric for t in (*self.targets, *self.advanced) if t.status == NOT_MEASURED]

    def target(self, metric: str) -> Optional[TargetResult]:
        return next((t for t in self.targets if t.metric == metric), None)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "performance_score": self.performance_score,
            "mandatory_passed": self.mandatory_passed,
            "unattested": self.unattested,
            "not_applicable": self.not_applicable,
            "targets_measured": self.targets_measured,
            "targets_total": sum(t.status != NOT_APPLICABLE for t in self.targets),
            "all_targets_met": self.all_targets_met,
            "not_measured": self.not_measured,
            "mandatory": [asdict(m) for m in self.mandatory],
            "targets": [asdict(t) for t in self.targets],
            "advanced": [asdict(t) for t in self.advanced],
        }


def lookup_metric(results: Mapping[str, Any], key: str) -> Any:
    """The value at dotted `key`, or None. Metric names contain dots too ("mAP_0.5"), so every split is tried."""
    value = _walk(results, key)
    return None if value is _ABSENT else value


def _walk(node: Mapping[str, Any], key: str) -> Any:
    if key in node:
        return node[key]
    for i, char in enumerate(key):
        if char == "." and isinstance(node.get(key[:i]), Mapping):
            found = _walk(node[key[:i]], key[i + 1 :])
            if found is not _ABSENT:
                return found
    return _ABSENT


def read_metric(results: Mapping[str, Any], key: str) -> Optional[float]:
    """A numeric measurement at `key`, None if absent; anything else is an error naming the key."""
    value = lookup_metric(results, key)
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__float__")):
        raise ValueError(f"results[{key!r}]={value!r} must be a number")
    return float(value)


def target_score(op: str, target: float, measured: float) -> float:
    """One target's contribution: 1.0 when met, else how close (see the module docstring)."""
    if math.isnan(measured):
        return 0.0
    if op == GE:
        if target <= 0:
            return 1.0 if measured >= target else 0.0
        return max(0.0, min(measured / target, 1.0))
    if op == LE:
        if measured <= 0:
            return 1.0 if measured <= target else 0.0
        return max(0.0, min(target / measured, 1.0))
    raise ValueError(f"target op {op!r} is not one of ['<=', '>=']")


def _judge_target(spec: TargetSpec, results: Mapping[str, Any], ruled_out: Sequence[str] = ()) -> TargetResult:
    if any(spec.metric.startswith(prefix) for prefix in ruled_out):
        return TargetResult(spec.metric, spec.op, spec.value, None, NOT_APPLICABLE, None)
    measured = read_metric(results, spec.metric)
    if measured is None:
        return TargetResult(spec.metric, spec.op, spec.value, None, NOT_MEASURED, None)
    met = measured >= spec.value if spec.op == GE else measured <= spec.value
    return TargetResult(spec.metric, spec.op, spec.value, measured, MET if met else NOT_MET,
                        target_score(spec.op, spec.value, measured))


def _judge_mandatory(name: str, checks: Mapping[str, Any]) -> MandatoryResult:
    value = checks.get(name)
    if value is None:
        return MandatoryResult(name, NOT_MEASURED)
    if value not in CHECK_STATUS:
        raise ValueError(f"results['mandatory_checks'][{name!r}]={value!r} must be one of {sorted(CHECK_STATUS)}")
    return MandatoryResult(name, CHECK_STATUS[value])


def performance_score(targets: Sequence[TargetResult]) -> Optional[float]:
    """Mean over every applicable target, an unmeasured one counting 0; None when none was measured at all."""
    applicable = [t for t in targets if t.status != NOT_APPLICABLE]
    if not any(t.score is not None for t in applicable):
        return None
    return sum(t.score or 0.0 for t in applicable) / len(applicable)


def stage_criteria(evaluation: EvaluationConfig, stage: int) -> StageCriteria:
    if stage not in evaluation.stages:
        raise ConfigError(f"evaluation.stages: no stage {stage} (have {sorted(evaluation.stages)})")
    criteria = evaluation.stages[stage]
    _validate_targets(f"evaluation.stages.{stage}", criteria)
    return criteria


def _validate_targets(prefix: str, criteria: StageCriteria) -> None:
    for group in ("targets", "advanced"):
        for i, spec in enumerate(getattr(criteria, group)):
            key = f"{prefix}.{group}[{i}]"
            if spec.op not in (GE, LE):
                raise ConfigError(f"{key}.op={spec.op!r} is not one of ['<=', '>=']")
            if not spec.metric:
                raise ConfigError(f"{key}.metric is empty")
            if not math.isfinite(spec.value):
                raise ConfigError(f"{key}.value={spec.value!r} must be a finite number")


def validate_evaluation_config(evaluation: EvaluationConfig) -> None:
    """Every stage table and the thresholds; raises ConfigError naming the bad key."""
    from pillsnap.evaluate.checks import DEFINITIONS

    for stage in evaluation.stages:
        stage_criteria(evaluation, stage)
        unknown = [n for n in evaluation.stages[stage].mandatory_checks if n not in DEFINITIONS]
        if unknown:
            raise ConfigError(f"evaluation.stages.{stage}.mandatory_checks: no check named {unknown}; the checks "
                              f"are {sorted(DEFINITIONS)}")
    unknown = [n for n in evaluation.checks.attested if n not in DEFINITIONS]
    if unknown:
        raise ConfigError(f"evaluation.checks.attested: no check named {unknown}")
    t = evaluation.recommendation
    if not 0.0 <= t.optimize_min_score <= t.proceed_min_score <= 1.0:
        raise ConfigError(
            "evaluation.recommendation: need 0 <= optimize_min_score <= proceed_min_score <= 1, got "
            f"optimize_min_score={t.optimize_min_score}, proceed_min_score={t.proceed_min_score}"
        )


def evaluate_criteria(evaluation: EvaluationConfig, stage: int, results: Mapping[str, Any],
                      ruled_out: Sequence[str] = ()) -> CriteriaReport:
    """Judge `results` against the stage's mandatory checks and targets (D-14). `ruled_out`: metric prefixes the
    configuration rules out (see ruled_out_targets)."""
    criteria = stage_criteria(evaluation, stage)
    checks = results.get("mandatory_checks") or {}
    if not isinstance(checks, Mapping):
        raise ValueError(f"results['mandatory_checks'] must be a dict of name -> status, got {type(checks).__name__}")
    targets = [_judge_target(t, results, ruled_out) for t in criteria.targets]
    return CriteriaReport(
        stage=stage,
        mandatory=[_judge_mandatory(name, checks) for name in criteria.mandatory_checks],
        targets=targets,
        advanced=[_judge_target(t, results) for t in criteria.advanced],
        performance_score=performance_score(targets),
    )


def ruled_out_targets(cfg) -> List[str]:
    """The target groups this configuration cannot have: no detector, no detector targets."""
    return [] if cfg.detection.enabled else ["detection."]


def recommendation_for_score(score: Optional[float], thresholds: RecommendationThresholds) -> str:
    """The advisor level for a performance score; no score at all (nothing measured) is WARN_STOP."""
    if score is None or math.isnan(score):
        return WARN_STOP
    if score >= thresholds.proceed_min_score:
        return RECOMMEND_PROCEED
    if score >= thresholds.optimize_min_score:
        return SUGGEST_OPTIMIZE
    return WARN_STOP
