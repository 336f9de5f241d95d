"""D-12 Go/No-Go: each reason code on its own, the GO case, missing measurements, bad input."""
import json
import math

import pytest

from pillsnap.config import load_config
from pillsnap.evaluate.results import StageResults, Status
from pillsnap.evaluate.go_no_go import (
    ACC_BELOW_TARGET,
    COVERAGE_TOO_LOW,
    CRASH_DETECTED,
    GO,
    LATENCY_P95_TOO_HIGH,
    MEMORY_UNSTABLE,
    CLASSES_LOST,
    NO_GO,
    NOT_ENOUGH_SAMPLES,
    REASON_CODES,
    REGRESSION_TOO_LARGE,
    evaluate_go_no_go,
    format_table,
)
from tests.unit.evaluate.support import results


@pytest.fixture(scope="module")
def cfg():
    return load_config()


GOOD = {"latency_p95_ms": 150.0, "n": 2500, "class_coverage": 0.5, "accuracy": 0.80, "previous_stage_photos": 300,
        "previous_stage_val_hash": "v1"}


def base(accuracy, stage=1):
    """The previous approved stage's figures as a decision recorded them: measured on 300 photos, rows v1."""
    return {"accuracy": accuracy, "stage": stage, "photos": 300, "val_hash": "v1"}


def good_results(no_crashes="pass", memory_stable="pass", lost_classes=0, **changes):
    """A passing Stage 1 classifier with `changes`; the two flags are stage checks (None: not measured)."""
    checks = {name: status for name, status in (("no_crashes", no_crashes), ("memory_stable", memory_stable))
              if status is not None}
    return results(checks=checks, data={"lost_classes": lost_classes}, **{**GOOD, **changes})


def gated(spec):
    """A stage spec that also gates lost classes (as the shipped Stage 4 does)."""
    from dataclasses import replace

    return replace(spec, max_lost_classes=0)


def test_all_checks_pass_is_go(cfg):
    decision = evaluate_go_no_go(gated(cfg.stage(1)), good_results(previous_stage_accuracy=0.80), baseline=base(0.79),
                                 stage=2)
    assert decision.decision == GO and decision.go
    assert decision.reasons == []
    assert {c.status for c in decision.rows} == {"pass"}
    assert len(decision.rows) == len(REASON_CODES)


# Each row changes one thing against stage 1 (min_accuracy 0.78, p95 220 ms, 2000 samples, coverage 0.2,
# max_acc_drop 0.02): exactly that reason code must come out, and nothing else.
REASON_TABLE = [
    (LATENCY_P95_TOO_HIGH, {"latency_p95_ms": 221.0}, None),
    (NOT_ENOUGH_SAMPLES, {"n": 1999}, None),
    (COVERAGE_TOO_LOW, {"class_coverage": 0.19}, None),
    (REGRESSION_TOO_LARGE, {"previous_stage_accuracy": 0.80}, base(0.83)),
    (ACC_BELOW_TARGET, {"accuracy": 0.777}, None),
    (CRASH_DETECTED, {"no_crashes": "fail"}, None),
    (MEMORY_UNSTABLE, {"memory_stable": "fail"}, None),
    (CLASSES_LOST, {"lost_classes": 1}, None),
]


@pytest.mark.parametrize("code, changes, baseline", REASON_TABLE, ids=[row[0] for row in REASON_TABLE])
def test_each_reason_code_alone(cfg, code, changes, baseline):
    decision = evaluate_go_no_go(gated(cfg.stage(1)), good_results(**changes), baseline=baseline,
                                 stage=2 if baseline else 1)
    assert decision.decision == NO_GO
    assert decision.reasons == [code]
    failing = [c for c in decision.rows if c.blocks_go]
    assert len(failing) == 1 and failing[0].status == "fail" and failing[0].reason_code == code


def test_reason_table_covers_every_code():
    assert sorted(row[0] for row in REASON_TABLE) == sorted(REASON_CODES)


def test_all_failures_are_reported_together(cfg):
    bad = good_results(latency_p95_ms=999, n=1, class_coverage=0.0, accuracy=0.1, previous_stage_accuracy=0.1,
                       no_crashes="fail", memory_stable="fail", lost_classes=3)
    decision = evaluate_go_no_go(gated(cfg.stage(1)), bad, baseline=base(0.9), stage=2)
    assert decision.reasons == list(REASON_CODES)


MEASUREMENT_KEYS = [
    ("latency_p95_ms", {"latency_p95_ms": None}, LATENCY_P95_TOO_HIGH),
    ("n_eval_samples", {"n": None}, NOT_ENOUGH_SAMPLES),
    ("class_coverage", {"class_coverage": None}, COVERAGE_TOO_LOW),
    ("no_crashes", {"no_crashes": None}, CRASH_DETECTED),
    ("memory_stable", {"memory_stable": "unattested"}, MEMORY_UNSTABLE),  # only a measured check counts
    ("lost_classes", {"lost_classes": None}, CLASSES_LOST),
]


@pytest.mark.parametrize("key, missing, code", MEASUREMENT_KEYS, ids=[row[0] for row in MEASUREMENT_KEYS])
def test_missing_measurement_blocks_go_and_says_so(cfg, key, missing, code):
    decision = evaluate_go_no_go(gated(cfg.stage(1)), good_results(**missing), stage=1)
    assert decision.reasons == [code]
    assert decision.not_measured == [key]
    row = next(c for c in decision.rows if c.reason_code == code)
    assert row.status == Status.NOT_MEASURED and row.measured is None


def test_missing_accuracies_block_their_checks(cfg):
    measured = good_results(accuracy=None)  # and this model was never evaluated on the previous stage's photos
    decision = evaluate_go_no_go(cfg.stage(1), measured, baseline=base(0.8), stage=2)
    assert decision.reasons == [REGRESSION_TOO_LARGE, ACC_BELOW_TARGET]
    assert decision.not_measured == ["accuracy_regression", "accuracy"]
    row = next(c for c in decision.rows if c.name == "accuracy_regression")
    assert "not evaluated on Stage 1's validation photos" in row.detail


def _regression(decision):
    return next(c for c in decision.rows if c.reason_code == REGRESSION_TOO_LARGE)


def test_the_regression_guard_is_skipped_only_at_stage_1_or_on_a_recorded_decision(cfg):
    first = evaluate_go_no_go(cfg.stage(1), good_results(), stage=1)
    assert first.go and _regression(first).status == Status.SKIPPED
    silent = evaluate_go_no_go(cfg.stage(1), good_results(previous_stage_accuracy=0.9), stage=2)
    assert silent.reasons == [REGRESSION_TOO_LARGE] and _regression(silent).status == Status.NOT_MEASURED
    forced = evaluate_go_no_go(cfg.stage(1), good_results(), stage=2,
                               skip_reason="run without an approved Stage 1: kim: rebuilding the baseline")
    assert forced.go and _regression(forced).status == Status.SKIPPED and "kim" in _regression(forced).detail
    empty_baseline = evaluate_go_no_go(cfg.stage(1), good_results(previous_stage_accuracy=0.9), baseline={},
                                       stage=2)
    assert empty_baseline.reasons == [REGRESSION_TOO_LARGE]


def test_the_regression_guard_compares_like_with_like(cfg):
    """The rehearsal's false NO_GO: 0.337 on 60 classes vs 0.367 on 30 said nothing; on Stage 2's own photos the
    new model's 0.372 vs the Stage 2 model's 0.367 is no regression. A real drop there is one."""
    spec = cfg.stage(3)
    same_photos = good_results(accuracy=0.337, previous_stage_accuracy=0.372)
    row = _regression(evaluate_go_no_go(spec, same_photos, baseline=base(0.367, 2), stage=3))
    assert row.status == "pass" and row.measured == 0.372 and "Stage 2's validation photos" in row.detail
    worse = good_results(accuracy=0.9, previous_stage_accuracy=0.35)
    assert _regression(evaluate_go_no_go(spec, worse, baseline=base(0.367, 2), stage=3)).status == "fail"


@pytest.mark.parametrize("baseline, why", [
    ({"photos": 250}, "on 300 of Stage 2's validation photos"),
    ({"val_hash": "v2"}, "(rows v1), the Stage 2 model's accuracy on 300 (rows v2)"),
    ({"photos": None}, "accuracy on None")])
def test_the_regression_guard_refuses_a_baseline_measured_on_other_photos(cfg, baseline, why):
    """Issue 28 point 8: the guard carried the baseline's photo count but never compared it."""
    row = _regression(evaluate_go_no_go(cfg.stage(3), good_results(previous_stage_accuracy=0.9),
                                        baseline={**base(0.367, 2), **baseline}, stage=3))
    assert row.status == Status.NOT_MEASURED and "not like for like" in row.detail and why in row.detail


def test_accuracy_hysteresis_uses_epsilon(cfg):
    spec = cfg.stage(1)  # 0.78 - 0.002
    assert evaluate_go_no_go(spec, good_results(accuracy=0.7785), stage=1).go
    assert evaluate_go_no_go(spec, good_results(accuracy=0.7775), stage=1).reasons == [ACC_BELOW_TARGET]


def test_regression_allows_the_configured_drop(cfg):
    spec = cfg.stage(1)  # max_acc_drop 0.02
    assert evaluate_go_no_go(spec, good_results(previous_stage_accuracy=0.815), baseline=base(0.83), stage=2).go
    row = _regression(evaluate_go_no_go(spec, good_results(previous_stage_accuracy=0.8), baseline=base(0.83),
                                        stage=2))
    assert row.target == pytest.approx(0.81)


def test_lost_classes_are_gated_where_the_stage_bounds_them_and_skipped_on_the_record_elsewhere(cfg):
    assert cfg.stage(4).max_lost_classes == 0 and cfg.stage(1).max_lost_classes is None  # the shipped bounds
    row = next(r for r in evaluate_go_no_go(cfg.stage(1), good_results(lost_classes=5), stage=1).rows
               if r.name == "lost_classes")
    assert row.status == Status.SKIPPED and "max_lost_classes is null" in row.detail
    stage_4 = evaluate_go_no_go(cfg.stage(4), good_results(lost_classes=1, accuracy=0.9, n=20000, class_coverage=0.8,
                                                           latency_p95_ms=100.0), stage=4, baseline=None,
                                skip_reason="by hand")
    assert stage_4.reasons == [CLASSES_LOST]


def test_targets_come_from_the_stage(cfg):
    measured = good_results(latency_p95_ms=210.0, n=20000, class_coverage=0.8, accuracy=0.9)
    assert evaluate_go_no_go(cfg.stage(1), measured, stage=1).go
    assert evaluate_go_no_go(cfg.stage(3), measured, stage=1).reasons == [LATENCY_P95_TOO_HIGH]


def test_nan_accuracy_fails(cfg):
    assert evaluate_go_no_go(cfg.stage(1), good_results(accuracy=math.nan), stage=1).reasons == [ACC_BELOW_TARGET]


@pytest.mark.parametrize("key, value", [("accuracy", "0.9"), ("n", True), ("latency_p95_ms", [1.0])])
def test_a_bad_value_at_the_task_boundary_names_its_field(key, value):
    doc = good_results().to_dict()
    doc["classifier"][key] = value
    with pytest.raises(ValueError, match=rf"results classifier\.{key}="):
        StageResults.from_dict(doc)
    with pytest.raises(ValueError, match="'bogus' is not a valid Status"):
        StageResults.from_dict({**good_results().to_dict(), "checks": {"no_crashes": "bogus"}})


def test_only_typed_results_are_judged(cfg):
    with pytest.raises(TypeError, match="StageResults"):
        evaluate_go_no_go(cfg.stage(1), dict(GOOD), stage=1)


def test_report_forms(cfg):
    decision = evaluate_go_no_go(cfg.stage(2), good_results(previous_stage_accuracy=0.8), stage=2,
                                 baseline=base(0.8))
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["decision"] == NO_GO and data["stage"] == 2
    assert data["reasons"] == [NOT_ENOUGH_SAMPLES, ACC_BELOW_TARGET]
    assert {row["name"] for row in data["rows"]} >= {"latency_p95_ms", "accuracy"}
    table = format_table(decision)
    assert "NO_GO" in table and "n_eval_samples" in table and "5000" in table
