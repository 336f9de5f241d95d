"""D-12 Go/No-Go: a stage passes only when every check passes; every failing check names its reason code.

Results are a flat dict of measurements (keys below). A measurement that is absent (or None) fails its
check with status "not_measured": a stage never goes on because nobody measured the thing that would stop it.

The regression guard compares like with like: this stage's model on the previous stage's validation photos
(`previous_stage_accuracy`) against the previous model's accuracy on those same photos (the baseline). It is
skipped only at Stage 1, or when a person ran the stage without an approved predecessor (`skip_reason`, recorded
in the ledger); with a stage above 1 and no baseline it is not measured, which blocks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from pillsnap.config import StageSpec

GO, NO_GO = "GO", "NO_GO"

LATENCY_P95_TOO_HIGH = "LATENCY_P95_TOO_HIGH"
NOT_ENOUGH_SAMPLES = "NOT_ENOUGH_SAMPLES"
COVERAGE_TOO_LOW = "COVERAGE_TOO_LOW"
REGRESSION_TOO_LARGE = "REGRESSION_TOO_LARGE"
ACC_BELOW_TARGET = "ACC_BELOW_TARGET"
CRASH_DETECTED = "CRASH_DETECTED"
MEMORY_UNSTABLE = "MEMORY_UNSTABLE"
REASON_CODES = (
    LATENCY_P95_TOO_HIGH,
    NOT_ENOUGH_SAMPLES,
    COVERAGE_TOO_LOW,
    REGRESSION_TOO_LARGE,
    ACC_BELOW_TARGET,
    CRASH_DETECTED,
    MEMORY_UNSTABLE,
)

# Keys of the results dict this module reads.
LATENCY_P95_MS = "latency_p95_ms"
N_EVAL_SAMPLES = "n_eval_samples"
CLASS_COVERAGE = "class_coverage"
ACCURACY = "accuracy"
PREVIOUS_STAGE_ACCURACY = "previous_stage_accuracy"
NO_CRASHES = "no_crashes"
MEMORY_STABLE = "memory_stable"

PASS, FAIL, NOT_MEASURED, SKIPPED = "pass", "fail", "not_measured", "skipped"

Measured = Union[float, bool, None]


@dataclass(frozen=True)
class CheckResult:
    """One row of the Go/No-Go table: what was measured, against what, and the verdict."""

    name: str
    reason_code: str
    status: str  # pass | fail | not_measured | skipped
    measured: Measured
    comparison: str  # how measured must relate to target: ">=", "<=" or "=="
    target: Measured
    detail: str = ""

    @property
    def blocks_go(self) -> bool:
        return self.status in (FAIL, NOT_MEASURED)


@dataclass(frozen=True)
class GoNoGoDecision:
    decision: str  # GO | NO_GO
    reasons: List[str]  # reason codes of every blocking check, in table order
    checks: List[CheckResult] = field(default_factory=list)
    stage: Optional[int] = None

    @property
    def go(self) -> bool:
        return self.decision == GO

    @property
    def not_measured(self) -> List[str]:
        return [c.name for c in self.checks if c.status == NOT_MEASURED]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "decision": self.decision,
            "reasons": list(self.reasons),
            "not_measured": self.not_measured,
            "checks": [asdict(c) for c in self.checks],
        }


def _read_number(values: Mapping[str, Any], key: str, source: str = "results") -> Optional[float]:
    value = values.get(key)
    if value is None:
        return None
    is_number = isinstance(value, (int, float)) or hasattr(value, "__float__")  # numpy scalars too
    if isinstance(value, bool) or not is_number:
        raise ValueError(f"{source}[{key!r}]={value!r} must be a number")
    return float(value)


def _read_flag(values: Mapping[str, Any], key: str) -> Optional[bool]:
    value = values.get(key)
    if value is None:
        return None
    if type(value).__name__ not in ("bool", "bool_"):  # numpy booleans are fine, 0/1 or "yes" are not
        raise ValueError(f"results[{key!r}]={value!r} must be true or false")
    return bool(value)


def _compare(name: str, code: str, measured: Optional[float], op: str, target: float, detail: str = "") -> CheckResult:
    if measured is None:
        return CheckResult(name, code, NOT_MEASURED, None, op, target, detail or "not measured")
    ok = measured >= target if op == ">=" else measured <= target  # NaN fails both
    return CheckResult(name, code, PASS if ok else FAIL, measured, op, target, detail)


def _flag_check(name: str, code: str, measured: Optional[bool]) -> CheckResult:
    if measured is None:
        return CheckResult(name, code, NOT_MEASURED, None, "==", True, "not measured")
    return CheckResult(name, code, PASS if measured else FAIL, measured, "==", True)


def _regression_check(spec: StageSpec, results: Mapping[str, Any], baseline: Optional[Mapping[str, Any]],
                      stage: Optional[int], skip_reason: Optional[str]) -> CheckResult:
    name = "accuracy_regression"
    measured = _read_number(results, PREVIOUS_STAGE_ACCURACY)
    if stage == 1:
        return CheckResult(name, REGRESSION_TOO_LARGE, SKIPPED, None, ">=", None, "Stage 1 has no previous stage")
    if baseline is None:
        if skip_reason:
            return CheckResult(name, REGRESSION_TOO_LARGE, SKIPPED, measured, ">=", None, skip_reason)
        return CheckResult(name, REGRESSION_TOO_LARGE, NOT_MEASURED, measured, ">=", None,
                           "no approved previous stage to compare with")
    base_acc = _read_number(baseline, ACCURACY, source="baseline")
    if base_acc is None:
        return CheckResult(name, REGRESSION_TOO_LARGE, NOT_MEASURED, measured, ">=", None, "baseline has no accuracy")
    floor = base_acc - spec.max_acc_drop
    prev = baseline.get("stage", "previous")
    detail = (f"this model on Stage {prev}'s validation photos vs the Stage {prev} model's {base_acc:.4f} there "
              f"- max_acc_drop {spec.max_acc_drop}")
    if measured is None:
        return CheckResult(name, REGRESSION_TOO_LARGE, NOT_MEASURED, None, ">=", floor,
                           f"this model was not evaluated on Stage {prev}'s validation photos")
    return _compare(name, REGRESSION_TOO_LARGE, measured, ">=", floor, detail)


def evaluate_go_no_go(
    spec: StageSpec,
    results: Mapping[str, Any],
    baseline: Optional[Mapping[str, Any]] = None,
    stage: Optional[int] = None,
    skip_reason: Optional[str] = None,
) -> GoNoGoDecision:
    """Judge one stage's results against its `cfg.data.stages[n]` targets (D-12).

    `results` keys: latency_p95_ms, n_eval_samples, class_coverage (0..1), accuracy (0..1), previous_stage_accuracy
    (this model on the previous stage's val photos), no_crashes (bool), memory_stable (bool). `baseline`: the
    previous approved stage's {accuracy, stage}. `skip_reason`: why the regression guard is skipped (recorded).
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict of measurements, got {type(results).__name__}")
    accuracy = _read_number(results, ACCURACY)
    acc_floor = spec.min_accuracy - spec.epsilon_acc
    checks = [
        _compare("latency_p95_ms", LATENCY_P95_TOO_HIGH, _read_number(results, LATENCY_P95_MS), "<=", spec.max_latency_ms),
        _compare("n_eval_samples", NOT_ENOUGH_SAMPLES, _read_number(results, N_EVAL_SAMPLES), ">=", spec.min_eval_samples),
        _compare("class_coverage", COVERAGE_TOO_LOW, _read_number(results, CLASS_COVERAGE), ">=", spec.min_coverage),
        _regression_check(spec, results, baseline, stage, skip_reason),
        _compare(
            "accuracy", ACC_BELOW_TARGET, accuracy, ">=", acc_floor,
            f"min_accuracy {spec.min_accuracy} - epsilon_acc {spec.epsilon_acc} (hysteresis)",
        ),
        _flag_check("no_crashes", CRASH_DETECTED, _read_flag(results, NO_CRASHES)),
        _flag_check("memory_stable", MEMORY_UNSTABLE, _read_flag(results, MEMORY_STABLE)),
    ]
    reasons = [c.reason_code for c in checks if c.blocks_go]
    return GoNoGoDecision(NO_GO if reasons else GO, reasons, checks, stage)


def format_table(decision: GoNoGoDecision) -> str:
    """A plain-text table (for logs and report artifacts)."""
    lines = [f"Go/No-Go{'' if decision.stage is None else f' stage {decision.stage}'}: {decision.decision}"]
    lines.append(f"{'check':<22} {'status':<13} {'measured':>12}    {'target':>12}  detail")
    for c in decision.checks:
        measured = "-" if c.measured is None else _fmt(c.measured)
        target = "-" if c.target is None else _fmt(c.target)
        lines.append(f"{c.name:<22} {c.status:<13} {measured:>12} {c.comparison:>2} {target:>12}  {c.detail}")
    return "\n".join(lines)


def _fmt(value: Measured) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6g}"
