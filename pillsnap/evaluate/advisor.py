"""D-14 OptimizationAdvisor: turns a stage's results into a recommendation, options and config suggestions.

It only returns data. The orchestrator shows it and pauses for a human choice among `Advice.options`
(stable ids: "proceed", "rerun_optimized", "stop"), or applies `orchestration.unattended_policy`.
Order of judgement: critical failures, then mandatory checks, then the performance score.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from pillsnap.config import PillSnapConfig
from pillsnap.evaluate.criteria import (
    RECOMMEND_PROCEED,
    SUGGEST_OPTIMIZE,
    WARN_STOP,
    CriteriaReport,
    evaluate_criteria,
    recommendation_for_score,
    ruled_out_targets,
)
from pillsnap.evaluate.results import StageResults
from pillsnap.evaluate.suggestions import (
    Suggestion,
    dedupe,
    diagnose,
    memory_suggestions,
    nan_loss_suggestions,
    worst_classes,
)

PROCEED, RERUN_OPTIMIZED, STOP = "proceed", "rerun_optimized", "stop"
OPTION_IDS = (PROCEED, RERUN_OPTIMIZED, STOP)

REPEATED_OOM, NAN_LOSS, DATA_CORRUPTION = "REPEATED_OOM", "NAN_LOSS", "DATA_CORRUPTION"
_COLORS = {RECOMMEND_PROCEED: "green", SUGGEST_OPTIMIZE: "yellow", WARN_STOP: "red"}


@dataclass(frozen=True)
class Option:
    id: str  # proceed | rerun_optimized | stop
    label: str


@dataclass(frozen=True)
class CriticalFailure:
    code: str  # REPEATED_OOM | NAN_LOSS | DATA_CORRUPTION
    key: str  # the measurement that showed it
    measured: float
    limit: Optional[float]


@dataclass(frozen=True)
class Advice:
    stage: int
    recommendation: str  # RECOMMEND_PROCEED | SUGGEST_OPTIMIZE | WARN_STOP
    reason: str
    message: str
    performance_score: Optional[float]
    options: List[Option]  # in the spec's order; the first is the recommended choice
    suggestions: List[Suggestion] = field(default_factory=list)
    critical_failures: List[CriticalFailure] = field(default_factory=list)
    failed_mandatory: List[str] = field(default_factory=list)
    worst_classes: List[Dict[str, Any]] = field(default_factory=list)
    criteria: Optional[CriteriaReport] = None

    @property
    def color(self) -> str:
        return _COLORS[self.recommendation]

    @property
    def recommended_option(self) -> str:
        return self.options[0].id

    @property
    def option_ids(self) -> List[str]:
        return [o.id for o in self.options]

    def overrides(self) -> List[str]:
        """The suggestions as CLI dotlist overrides, for a rerun."""
        return [s.as_override() for s in self.suggestions]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "recommendation": self.recommendation,
            "color": self.color,
            "reason": self.reason,
            "message": self.message,
            "performance_score": self.performance_score,
            "recommended_option": self.recommended_option,
            "options": [{"id": o.id, "label": o.label} for o in self.options],
            "suggestions": [s.to_dict() for s in self.suggestions],
            "overrides": self.overrides(),
            "critical_failures": [asdict(c) for c in self.critical_failures],
            "failed_mandatory": list(self.failed_mandatory),
            "worst_classes": list(self.worst_classes),
            "criteria": self.criteria.to_dict() if self.criteria else None,
        }


def _next_step(stage: int) -> str:
    return "the final test" if stage >= 4 else f"Stage {stage + 1}"


def _options(reason: str, stage: int) -> List[Option]:
    """The user's choices per outcome; labels keep the spec's meaning, ids are what the orchestrator acts on."""
    nxt = _next_step(stage)
    table = {
        "all_targets_met": [
            Option(PROCEED, f"Proceed to {nxt}"),
            Option(RERUN_OPTIMIZED, "Optimize further at the current stage"),
            Option(STOP, "Stop here and review the detailed analysis report"),
        ],
        "sufficient_performance": [
            Option(PROCEED, f"Proceed to {nxt} with the current performance"),
            Option(RERUN_OPTIMIZED, "Apply the recommended optimizations and retry"),
            Option(STOP, "Stop for manual hyperparameter tuning"),
        ],
        "performance_below_target": [
            Option(RERUN_OPTIMIZED, "Apply the suggestions and retry"),
            Option(PROCEED, f"Proceed to {nxt} with the current performance (risky)"),
            Option(STOP, "Stop for detailed debugging"),
        ],
        "performance_too_low": [
            Option(RERUN_OPTIMIZED, "Apply strong optimizations and retry"),
            Option(STOP, "Stop to review the architecture and check data quality"),
        ],
        "nothing_measured": [
            Option(RERUN_OPTIMIZED, "Rerun the stage so that its targets get measured"),
            Option(STOP, "Stop and find out why no target was measured"),
        ],
        "mandatory_checks_failed": [
            Option(RERUN_OPTIMIZED, "Fix the failing mandatory checks and rerun the stage"),
            Option(STOP, "Stop and investigate the failing checks"),
        ],
        "critical_failure": [
            Option(STOP, "Stop and investigate (logs, OOM history, data validation report)"),
            Option(RERUN_OPTIMIZED, "Apply the suggested fixes and rerun the stage"),
        ],
    }
    return table[reason]


def detect_critical_failures(results: StageResults, max_repeated_oom: int,
                             max_corruption: float) -> List[CriticalFailure]:
    """Stop criteria common to all stages: repeated OOM, a NaN/inf loss, too much corrupt data."""
    found = []
    t, d = results.training, results.data
    if t.repeated_oom > max_repeated_oom:
        found.append(CriticalFailure(REPEATED_OOM, "training.repeated_oom", t.repeated_oom, max_repeated_oom))
    if t.loss is not None and not math.isfinite(t.loss):
        found.append(CriticalFailure(NAN_LOSS, "training.loss", t.loss, None))
    if d.corruption_rate is not None and d.corruption_rate > max_corruption:
        found.append(CriticalFailure(DATA_CORRUPTION, "data.corruption_rate", d.corruption_rate, max_corruption))
    return found


class OptimizationAdvisor:
    def __init__(self, cfg: PillSnapConfig):
        self.cfg = cfg

    def evaluate_and_recommend(self, stage: int, results: StageResults) -> Advice:
        if not isinstance(results, StageResults):
            raise TypeError(f"results must be StageResults, got {type(results).__name__}")
        limits = self.cfg.evaluation.advisor
        report = evaluate_criteria(self.cfg.evaluation, stage, results, ruled_out_targets(self.cfg))
        worst = worst_classes(results, limits.worst_classes)
        critical = detect_critical_failures(results, limits.max_repeated_oom, limits.max_data_corruption_rate)
        if critical:
            return self._critical_failure(stage, results, report, critical, worst)
        if not report.mandatory_passed:
            waiting = (f"; {', '.join(report.unattested)} need a named person's confirmation (the review, or "
                       f"`pillsnap attest --stage {stage} --check NAME --reviewer NAME`)" if report.unattested else "")
            return self._advice(stage, WARN_STOP, "mandatory_checks_failed", report, results, worst,
                                f"Stage {stage}: mandatory checks not passed: {', '.join(report.failed_mandatory)}"
                                + waiting)
        level = recommendation_for_score(report.performance_score, self.cfg.evaluation.recommendation)
        reason, message = self._reason_for(stage, level, report)
        return self._advice(stage, level, reason, report, results, worst, message)

    def diagnose_and_suggest(self, stage: int, results: StageResults) -> List[Suggestion]:
        report = evaluate_criteria(self.cfg.evaluation, stage, results, ruled_out_targets(self.cfg))
        return diagnose(self.cfg, results, report)

    @staticmethod
    def _reason_for(stage: int, level: str, report: CriteriaReport) -> tuple[str, str]:
        score = report.performance_score
        if score is None:
            return "nothing_measured", f"Stage {stage}: no performance target was measured"
        total = report.to_dict()["targets_total"]
        measured = (f"score {score:.3f}; {report.targets_measured} of {total} targets measured, an unmeasured one "
                    "counts 0")
        if level == RECOMMEND_PROCEED and report.all_targets_met:
            return "all_targets_met", f"Stage {stage}: all targets met"
        if level == RECOMMEND_PROCEED:
            return "sufficient_performance", f"Stage {stage}: sufficient performance ({measured})"
        if level == SUGGEST_OPTIMIZE:
            return "performance_below_target", (f"Stage {stage}: performance below target; optimization "
                                                f"recommended ({measured})")
        return "performance_too_low", f"Stage {stage}: performance is very low ({measured})"

    def _advice(self, stage: int, level: str, reason: str, report: CriteriaReport, results: StageResults,
                worst: List[Dict[str, Any]], message: str) -> Advice:
        return Advice(
            stage=stage, recommendation=level, reason=reason, message=message,
            performance_score=report.performance_score, options=_options(reason, stage),
            suggestions=diagnose(self.cfg, results, report), failed_mandatory=report.failed_mandatory,
            worst_classes=worst, criteria=report,
        )

    def _critical_failure(self, stage: int, results: StageResults, report: CriteriaReport,
                          critical: List[CriticalFailure], worst: List[Dict[str, Any]]) -> Advice:
        fixes: List[Suggestion] = []
        for failure in critical:
            if failure.code == REPEATED_OOM:
                fixes += memory_suggestions(self.cfg, results, why=f"{int(failure.measured)} OOMs in one run")
            elif failure.code == NAN_LOSS:
                fixes += nan_loss_suggestions(self.cfg)
        codes = ", ".join(sorted({c.code for c in critical}))
        return Advice(
            stage=stage, recommendation=WARN_STOP, reason="critical_failure",
            message=f"Stage {stage}: critical failure ({codes}); the results cannot be trusted",
            performance_score=report.performance_score, options=_options("critical_failure", stage),
            suggestions=dedupe(fixes + diagnose(self.cfg, results, report)), critical_failures=critical,
            failed_mandatory=report.failed_mandatory, worst_classes=worst, criteria=report,
        )
