"""D-12 Go/No-Go: a stage passes only when every row passes; every blocking row names its reason code.

The rows read the typed StageResults (pillsnap.evaluate.results). A measurement that is None fails its row with
status not_measured: a stage never goes on because nobody measured the thing that would stop it.

The regression guard compares like with like: this stage's model on the previous stage's validation photos
(`previous_stage_accuracy`) against the previous model's accuracy on those same photos (the baseline). It is
skipped only at Stage 1, or when a person ran the stage without an approved predecessor (`skip_reason`, recorded
in the ledger); with a stage above 1 and no baseline it is not measured, which blocks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from pillsnap.config import StageSpec
from pillsnap.evaluate.results import ClassifierResults, StageResults, Status

GO, NO_GO = "GO", "NO_GO"

LATENCY_P95_TOO_HIGH = "LATENCY_P95_TOO_HIGH"
NOT_ENOUGH_SAMPLES = "NOT_ENOUGH_SAMPLES"
COVERAGE_TOO_LOW = "COVERAGE_TOO_LOW"
REGRESSION_TOO_LARGE = "REGRESSION_TOO_LARGE"
ACC_BELOW_TARGET = "ACC_BELOW_TARGET"
CRASH_DETECTED = "CRASH_DETECTED"
MEMORY_UNSTABLE = "MEMORY_UNSTABLE"
CLASSES_LOST = "CLASSES_LOST"
REASON_CODES = (
    LATENCY_P95_TOO_HIGH,
    NOT_ENOUGH_SAMPLES,
    COVERAGE_TOO_LOW,
    REGRESSION_TOO_LARGE,
    ACC_BELOW_TARGET,
    CRASH_DETECTED,
    MEMORY_UNSTABLE,
    CLASSES_LOST,
)

Measured = Union[float, bool, None]


@dataclass(frozen=True)
class GateRow:
    """One row of the Go/No-Go table: what was measured, against what, and the verdict."""

    name: str
    reason_code: str
    status: Status  # pass | fail | not_measured | skipped
    measured: Measured
    comparison: str  # how measured must relate to target: ">=", "<=" or "=="
    target: Measured
    detail: str = ""

    @property
    def blocks_go(self) -> bool:
        return self.status.blocks


@dataclass(frozen=True)
class GoNoGoDecision:
    decision: str  # GO | NO_GO
    reasons: List[str]  # reason codes of every blocking row, in table order
    rows: List[GateRow] = field(default_factory=list)
    stage: Optional[int] = None

    @property
    def go(self) -> bool:
        return self.decision == GO

    @property
    def not_measured(self) -> List[str]:
        return [c.name for c in self.rows if c.status == Status.NOT_MEASURED]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "decision": self.decision,
            "reasons": list(self.reasons),
            "not_measured": self.not_measured,
            "rows": [{**asdict(c), "status": c.status.value} for c in self.rows],
        }


def _compare(name: str, code: str, measured: Optional[float], op: str, target: float, detail: str = "") -> GateRow:
    if measured is None:
        return GateRow(name, code, Status.NOT_MEASURED, None, op, target, detail or "not measured")
    measured = float(measured)
    ok = measured >= target if op == ">=" else measured <= target  # NaN fails both
    return GateRow(name, code, Status.PASS if ok else Status.FAIL, measured, op, target, detail)


def _flag_row(name: str, code: str, check: Status) -> GateRow:
    """A stage check as a row: pass / fail as measured, anything else (not measured, unattested) not measured."""
    if check not in (Status.PASS, Status.FAIL):
        return GateRow(name, code, Status.NOT_MEASURED, None, "==", True, f"check status: {check.value}")
    return GateRow(name, code, check, check == Status.PASS, "==", True)


def _regression_row(spec: StageSpec, c: ClassifierResults, baseline: Optional[Mapping[str, Any]],
                    stage: Optional[int], skip_reason: Optional[str]) -> GateRow:
    """`baseline`: the previous decision's {accuracy, photos, val_hash, stage}: this model must have been evaluated on
    the same photos (their count and row hash), else the comparison is not like for like and it is not measured."""
    name, code, measured = "accuracy_regression", REGRESSION_TOO_LARGE, c.previous_stage_accuracy
    if stage == 1:
        return GateRow(name, code, Status.SKIPPED, None, ">=", None, "Stage 1 has no previous stage")
    if baseline is None:
        if skip_reason:
            return GateRow(name, code, Status.SKIPPED, measured, ">=", None, skip_reason)
        return GateRow(name, code, Status.NOT_MEASURED, measured, ">=", None,
                       "no approved previous stage to compare with")
    base_acc = baseline.get("accuracy")
    if base_acc is None:
        return GateRow(name, code, Status.NOT_MEASURED, measured, ">=", None, "baseline has no accuracy")
    floor = float(base_acc) - spec.max_acc_drop
    prev = baseline.get("stage", "previous")
    if measured is None:
        return GateRow(name, code, Status.NOT_MEASURED, None, ">=", floor,
                       f"this model was not evaluated on Stage {prev}'s validation photos")
    same_hash = baseline.get("val_hash") is None or baseline["val_hash"] == c.previous_stage_val_hash
    if baseline.get("photos") is None or c.previous_stage_photos != baseline["photos"] or not same_hash:
        return GateRow(name, code, Status.NOT_MEASURED, measured, ">=", floor,
                       f"not like for like: this model was evaluated on {c.previous_stage_photos} of Stage {prev}'s "
                       f"validation photos (rows {c.previous_stage_val_hash}), the Stage {prev} model's accuracy on "
                       f"{baseline.get('photos')} (rows {baseline.get('val_hash')})")
    detail = (f"this model on Stage {prev}'s validation photos vs the Stage {prev} model's {base_acc:.4f} there "
              f"- max_acc_drop {spec.max_acc_drop}")
    return _compare(name, code, measured, ">=", floor, detail)


def _lost_classes_row(spec: StageSpec, lost: Optional[int], stage: Optional[int]) -> GateRow:
    if spec.max_lost_classes is None:
        return GateRow("lost_classes", CLASSES_LOST, Status.SKIPPED, lost, "<=", None,
                       f"not gated at Stage {stage} (data.stages.{stage}.max_lost_classes is null)")
    return _compare("lost_classes", CLASSES_LOST, lost, "<=", spec.max_lost_classes,
                    "classes of the release with no usable training photo (quarantine, import issues)")


def evaluate_go_no_go(spec: StageSpec, results: StageResults, baseline: Optional[Mapping[str, Any]] = None,
                      stage: Optional[int] = None, skip_reason: Optional[str] = None) -> GoNoGoDecision:
    """Judge one stage's results against its `cfg.data.stages[n]` targets (D-12).

    `baseline`: the previous approved stage's {accuracy, stage}. `skip_reason`: why the regression guard is
    skipped (recorded).
    """
    if not isinstance(results, StageResults):
        raise TypeError(f"results must be StageResults, got {type(results).__name__}")
    c = results.classifier
    rows = [
        _compare("latency_p95_ms", LATENCY_P95_TOO_HIGH, c.latency_p95_ms, "<=", spec.max_latency_ms),
        _compare("n_eval_samples", NOT_ENOUGH_SAMPLES, c.n, ">=", spec.min_eval_samples),
        _compare("class_coverage", COVERAGE_TOO_LOW, c.class_coverage, ">=", spec.min_coverage),
        _regression_row(spec, c, baseline, stage, skip_reason),
        _compare("accuracy", ACC_BELOW_TARGET, c.accuracy, ">=", spec.min_accuracy - spec.epsilon_acc,
                 f"min_accuracy {spec.min_accuracy} - epsilon_acc {spec.epsilon_acc} (hysteresis)"),
        _flag_row("no_crashes", CRASH_DETECTED, results.check("no_crashes")),
        _flag_row("memory_stable", MEMORY_UNSTABLE, results.check("memory_stable")),
        _lost_classes_row(spec, results.data.lost_classes, stage),
    ]
    reasons = [r.reason_code for r in rows if r.blocks_go]
    return GoNoGoDecision(NO_GO if reasons else GO, reasons, rows, stage)


def format_table(decision: GoNoGoDecision) -> str:
    """A plain-text table (for logs and report artifacts)."""
    lines = [f"Go/No-Go{'' if decision.stage is None else f' stage {decision.stage}'}: {decision.decision}"]
    lines.append(f"{'check':<22} {'status':<13} {'measured':>12}    {'target':>12}  detail")
    for c in decision.rows:
        measured = "-" if c.measured is None else _fmt(c.measured)
        target = "-" if c.target is None else _fmt(c.target)
        lines.append(f"{c.name:<22} {c.status.value:<13} {measured:>12} {c.comparison:>2} {target:>12}  {c.detail}")
    return "\n".join(lines)


def _fmt(value: Measured) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.6g}"
