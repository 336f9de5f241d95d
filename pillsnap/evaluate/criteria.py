"""D-14 stage criteria: mandatory checks, performance targets, and the performance score.

The tables live in the config (`evaluation.stages[n]`), so this module holds only the rules. They read the typed
StageResults: a mandatory check's status (results.check), a target's measurement (results.metric, by the names in
pillsnap.evaluate.results.METRICS; a target naming anything else is a configuration error, found when the config
is loaded). Every verdict is a Status: pass (met) | fail | not_measured | not_applicable (| attested | unattested
for the checks).

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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from pillsnap.config import ConfigError, EvaluationConfig, RecommendationThresholds, StageCriteria, TargetSpec
from pillsnap.evaluate.checks.registry import ATTESTABLE, DEFINITIONS
from pillsnap.evaluate.results import METRICS, StageResults, Status

GE, LE = ">=", "<="
RECOMMEND_PROCEED, SUGGEST_OPTIMIZE, WARN_STOP = "RECOMMEND_PROCEED", "SUGGEST_OPTIMIZE", "WARN_STOP"


@dataclass(frozen=True)
class TargetResult:
    metric: str
    op: str
    target: float
    measured: Optional[float]
    status: Status  # pass (met) | fail | not_measured | not_applicable
    score: Optional[float]  # contribution to the performance score; None when not measured or not applicable

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "target": self.target, "measured": self.measured,
                "status": self.status.value, "score": self.score}


@dataclass(frozen=True)
class MandatoryResult:
    name: str
    status: Status  # the stage check's own status

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status.value}


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
        return [m.name for m in self.mandatory if m.status.blocks]

    @property
    def unattested(self) -> List[str]:
        return [m.name for m in self.mandatory if m.status == Status.UNATTESTED]

    @property
    def not_applicable(self) -> List[str]:
        return [m.name for m in self.mandatory if m.status == Status.NOT_APPLICABLE] + \
            [t.metric for t in self.targets if t.status == Status.NOT_APPLICABLE]

    @property
    def targets_measured(self) -> int:
        return sum(t.status not in (Status.NOT_MEASURED, Status.NOT_APPLICABLE) for t in self.targets)

    @property
    def all_targets_met(self) -> bool:
        return all(t.status in (Status.PASS, Status.NOT_APPLICABLE) for t in self.targets)

    @property
    def not_measured(self) -> List[str]:
        checks = [m.name for m in self.mandatory if m.status == Status.NOT_MEASURED]
        return checks + [t.metric for t in (*self.targets, *self.advanced) if t.status == Status.NOT_MEASURED]

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
            "targets_total": sum(t.status != Status.NOT_APPLICABLE for t in self.targets),
            "all_targets_met": self.all_targets_met,
            "not_measured": self.not_measured,
            "mandatory": [m.to_dict() for m in self.mandatory],
            "targets": [t.to_dict() for t in self.targets],
            "advanced": [t.to_dict() for t in self.advanced],
        }


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


def _judge_target(spec: TargetSpec, results: StageResults, ruled_out: Sequence[str] = ()) -> TargetResult:
    if any(spec.metric.startswith(prefix) for prefix in ruled_out):
        return TargetResult(spec.metric, spec.op, spec.value, None, Status.NOT_APPLICABLE, None)
    measured = results.metric(spec.metric)
    if measured is None:
        return TargetResult(spec.metric, spec.op, spec.value, None, Status.NOT_MEASURED, None)
    met = measured >= spec.value if spec.op == GE else measured <= spec.value
    return TargetResult(spec.metric, spec.op, spec.value, measured, Status.PASS if met else Status.FAIL,
                        target_score(spec.op, spec.value, measured))


def performance_score(targets: Sequence[TargetResult]) -> Optional[float]:
    """Mean over every applicable target, an unmeasured one counting 0; None when none was measured at all."""
    applicable = [t for t in targets if t.status != Status.NOT_APPLICABLE]
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
            if spec.metric not in METRICS:
                raise ConfigError(f"{key}.metric={spec.metric!r} is no measurement of a stage; the measurements are "
                                  f"{sorted(METRICS)}")


def validate_evaluation_config(evaluation: EvaluationConfig) -> None:
    """Every stage table and the thresholds; raises ConfigError naming the bad key."""

    for stage in evaluation.stages:
        stage_criteria(evaluation, stage)
        unknown = [n for n in evaluation.stages[stage].mandatory_checks if n not in DEFINITIONS]
        if unknown:
            raise ConfigError(f"evaluation.stages.{stage}.mandatory_checks: no check named {unknown}; the checks "
                              f"are {sorted(DEFINITIONS)}")
    unknown = [n for n in evaluation.checks.attested if n not in DEFINITIONS]
    if unknown:
        raise ConfigError(f"evaluation.checks.attested: no check named {unknown}")
    measured = [n for n in evaluation.checks.attested if n not in ATTESTABLE]
    if measured:
        raise ConfigError(f"evaluation.checks.attested: {measured} are measured by this pipeline and cannot become a "
                          f"person's word; a config may only narrow the checks a person attests, which are "
                          f"{sorted(ATTESTABLE)}")
    t = evaluation.recommendation
    if not 0.0 <= t.optimize_min_score <= t.proceed_min_score <= 1.0:
        raise ConfigError(
            "evaluation.recommendation: need 0 <= optimize_min_score <= proceed_min_score <= 1, got "
            f"optimize_min_score={t.optimize_min_score}, proceed_min_score={t.proceed_min_score}"
        )


def evaluate_criteria(evaluation: EvaluationConfig, stage: int, results: StageResults,
                      ruled_out: Sequence[str] = ()) -> CriteriaReport:
    """Judge `results` against the stage's mandatory checks and targets (D-14). `ruled_out`: metric prefixes the
    configuration rules out (see ruled_out_targets)."""
    criteria = stage_criteria(evaluation, stage)
    targets = [_judge_target(t, results, ruled_out) for t in criteria.targets]
    return CriteriaReport(
        stage=stage,
        mandatory=[MandatoryResult(name, results.check(name)) for name in criteria.mandatory_checks],
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
