"""D-14 stage criteria: the config tables, the performance score, the recommendation thresholds."""
import math

import pytest

from pillsnap.config import ConfigError, RecommendationThresholds, load_config
from pillsnap.evaluate.criteria import (
    RECOMMEND_PROCEED,
    SUGGEST_OPTIMIZE,
    WARN_STOP,
    evaluate_criteria,
    performance_score,
    recommendation_for_score,
    stage_criteria,
    target_score,
    validate_evaluation_config,
)
from pillsnap.evaluate.results import StageResults, Status
from tests.unit.evaluate.support import measuring

MET, NOT_MET, NOT_MEASURED = Status.PASS, Status.FAIL, Status.NOT_MEASURED


@pytest.fixture(scope="module")
def cfg():
    return load_config()


def values_meeting(cfg, stage, fraction=1.0):
    """Every target of the stage measured at `fraction` of the way to its target (1.0 = exactly met)."""
    return {t.metric: t.value * fraction if t.op == ">=" else t.value / fraction
            for t in cfg.evaluation.stages[stage].targets}


def passing_checks(cfg, stage):
    return {name: "pass" for name in cfg.evaluation.stages[stage].mandatory_checks}


def results_meeting(cfg, stage, fraction=1.0, **values):
    return measuring({**values_meeting(cfg, stage, fraction), **values}, stage, passing_checks(cfg, stage))


def test_config_holds_the_spec_tables(cfg):
    ev = cfg.evaluation
    validate_evaluation_config(ev)
    assert sorted(ev.stages) == [1, 2, 3, 4]
    assert [len(ev.stages[n].targets) for n in (1, 2, 3, 4)] == [6, 9, 11, 11]
    assert all(len(ev.stages[n].mandatory_checks) == 4 for n in (1, 2, 3, 4))
    by_metric = {t.metric: (t.op, t.value) for t in ev.stages[4].targets}
    assert by_metric["classification.accuracy"] == (">=", 0.92)
    assert by_metric["production.inference_latency_ms"] == ("<=", 30)
    assert {t.metric for t in ev.stages[2].advanced} == {
        "advanced.class_imbalance_ratio", "advanced.loss_variance", "advanced.memory_peak_to_avg"}
    assert ev.recommendation.proceed_min_score == 0.7 and ev.recommendation.optimize_min_score == 0.5


@pytest.mark.parametrize(
    "op, target, measured, expected",
    [
        (">=", 0.40, 0.40, 1.0),
        (">=", 0.40, 0.90, 1.0),  # exceeding a target earns no extra credit
        (">=", 0.40, 0.20, 0.5),
        (">=", 0.40, -0.1, 0.0),
        ("<=", 50.0, 25.0, 1.0),
        ("<=", 50.0, 100.0, 0.5),
        ("<=", 50.0, 0.0, 1.0),
        (">=", 0.40, math.nan, 0.0),
    ],
)
def test_target_score(op, target, measured, expected):
    assert target_score(op, target, measured) == pytest.approx(expected)


def test_target_score_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="'>'"):
        target_score(">", 1.0, 1.0)


def test_all_targets_met_scores_one(cfg):
    report = evaluate_criteria(cfg.evaluation, 2, results_meeting(cfg, 2))
    assert report.performance_score == pytest.approx(1.0)
    assert report.mandatory_passed and report.all_targets_met
    assert report.not_measured == ["advanced.class_imbalance_ratio", "advanced.loss_variance",
                                   "advanced.memory_peak_to_avg"]


def test_score_is_the_mean_of_capped_ratios(cfg):
    # mAP half of 0.30, GPU memory twice the 14 GB limit
    results = results_meeting(cfg, 1, **{"detection.mAP_0.5": 0.15, "system.gpu_memory_gb": 28.0})
    report = evaluate_criteria(cfg.evaluation, 1, results)
    assert report.performance_score == pytest.approx((4 + 0.5 + 0.5) / 6)
    assert [t.status for t in report.targets].count(NOT_MET) == 2
    assert not report.all_targets_met


def test_unmeasured_targets_count_zero_and_the_report_says_how_many_were_measured(cfg):
    values = {k: v for k, v in values_meeting(cfg, 1).items() if not k.startswith("system.")}
    values["classification.accuracy"] = 0.2
    report = evaluate_criteria(cfg.evaluation, 1, measuring(values, 1, passing_checks(cfg, 1)))
    assert report.performance_score == pytest.approx((3 + 0.5) / 6)  # 2 of 6 unmeasured: 0 each
    assert report.targets_measured == 4 and report.to_dict()["targets_total"] == 6
    assert set(report.not_measured) == {"system.gpu_memory_gb", "system.data_loading_s"}
    assert report.target("system.gpu_memory_gb").status == NOT_MEASURED
    assert not report.all_targets_met


def test_the_issue_s_flattering_stage_3_score_no_longer_recommends_proceeding(cfg):
    """Stage 3: 3 of 11 targets unmeasured, 4 at 60 %, 4 met: the old mean over measured targets said 0.80."""
    targets = cfg.evaluation.stages[3].targets
    values = {}
    for i, t in enumerate(targets[3:]):  # the first three are left unmeasured
        values[t.metric] = t.value * (0.6 if i < 4 else 1.0) if t.op == ">=" else t.value / (0.6 if i < 4 else 1.0)
    report = evaluate_criteria(cfg.evaluation, 3, measuring(values, 3))
    assert report.targets_measured == 8
    assert report.performance_score == pytest.approx((4 * 0.6 + 4) / 11)  # 0.58: not 0.80
    from pillsnap.evaluate.criteria import recommendation_for_score
    assert recommendation_for_score(report.performance_score, cfg.evaluation.recommendation) == "SUGGEST_OPTIMIZE"


def test_nothing_measured_has_no_score(cfg):
    report = evaluate_criteria(cfg.evaluation, 3, StageResults(3))
    assert report.performance_score is None
    assert performance_score([]) is None
    assert not report.mandatory_passed
    assert len(report.not_measured) == 4 + 11


def test_mandatory_checks(cfg):
    checks = passing_checks(cfg, 1)
    checks["onnx_conversion_success"] = "fail"
    del checks["pipeline_complete"]
    report = evaluate_criteria(cfg.evaluation, 1, measuring(values_meeting(cfg, 1), 1, checks))
    assert report.failed_mandatory == ["pipeline_complete", "onnx_conversion_success"]
    assert {m.name: m.status for m in report.mandatory}["pipeline_complete"] == NOT_MEASURED


def test_advanced_metrics_are_judged_but_not_scored(cfg):
    report = evaluate_criteria(cfg.evaluation, 2, results_meeting(cfg, 2, **{"advanced.class_imbalance_ratio": 40.0}))
    assert report.performance_score == pytest.approx(1.0)
    row = next(a for a in report.advanced if a.metric == "advanced.class_imbalance_ratio")
    assert row.status == NOT_MET and row.score == pytest.approx(0.25)


def test_every_shipped_target_names_a_measurement_and_a_typo_is_a_config_error():
    cfg = load_config()
    measured = measuring({"detection.mAP_0.5": 0.3, "detection.mAP_0.5_0.95": 0.2})
    assert measured.metric("detection.mAP_0.5") == 0.3 and measured.metric("detection.mAP_0.5_0.95") == 0.2
    assert measured.metric("detection.recall") is None and measured.metric("production.api_success_pct") is None
    cfg.evaluation.stages[2].targets[0].metric = "detection.mAP50"
    with pytest.raises(ConfigError, match=r"evaluation\.stages\.2\.targets\[0\]\.metric='detection.mAP50' is no "
                                          r"measurement"):
        validate_evaluation_config(cfg.evaluation)


@pytest.mark.parametrize(
    "score, level",
    [(1.0, RECOMMEND_PROCEED), (0.7, RECOMMEND_PROCEED), (0.69, SUGGEST_OPTIMIZE), (0.5, SUGGEST_OPTIMIZE),
     (0.49, WARN_STOP), (0.0, WARN_STOP), (None, WARN_STOP)],
)
def test_recommendation_thresholds(score, level):
    assert recommendation_for_score(score, RecommendationThresholds()) == level


def test_strict_proceed_threshold_from_the_config():
    strict = load_config(overrides=["evaluation.recommendation.proceed_min_score=1.0"]).evaluation.recommendation
    assert recommendation_for_score(0.95, strict) == SUGGEST_OPTIMIZE


def test_bad_config_names_the_key():
    bad_op = load_config()
    bad_op.evaluation.stages[1].targets[0].op = ">"
    with pytest.raises(ConfigError, match=r"evaluation\.stages\.1\.targets\[0\]\.op='>'"):
        stage_criteria(bad_op.evaluation, 1)
    with pytest.raises(ConfigError, match="no stage 7"):
        stage_criteria(bad_op.evaluation, 7)
    inverted = load_config(overrides=["evaluation.recommendation.optimize_min_score=0.9"])
    with pytest.raises(ConfigError, match="optimize_min_score=0.9"):
        validate_evaluation_config(inverted.evaluation)


def test_met_status_at_exact_target(cfg):
    report = evaluate_criteria(cfg.evaluation, 1, results_meeting(cfg, 1))
    assert {t.status for t in report.targets} == {MET}


def test_an_unattested_check_blocks_like_a_failure_until_a_person_attests_it(cfg):
    for status, passed, unattested in (("unattested", False, ["cloudflare_tunnel_setup"]), ("attested", True, []),
                                       ("fail", False, [])):
        checks = {**passing_checks(cfg, 4), "cloudflare_tunnel_setup": status}
        report = evaluate_criteria(cfg.evaluation, 4, measuring(values_meeting(cfg, 4), 4, checks))
        assert (report.mandatory_passed, report.unattested) == (passed, unattested), status


def test_check_names_must_exist_in_the_registry():
    cfg = load_config()
    cfg.evaluation.stages[2].mandatory_checks.append("gpu_goes_brrr")
    with pytest.raises(ConfigError, match=r"evaluation.stages.2.mandatory_checks: no check named \['gpu_goes_brrr'\]"):
        validate_evaluation_config(cfg.evaluation)
    cfg = load_config()
    cfg.evaluation.checks.attested = ["tunnel"]
    with pytest.raises(ConfigError, match=r"evaluation.checks.attested: no check named \['tunnel'\]"):
        validate_evaluation_config(cfg.evaluation)


def test_a_check_ruled_out_by_the_configuration_neither_passes_nor_blocks_and_is_named(cfg):
    checks = {**passing_checks(cfg, 1), "detection_model_loading": "not_applicable"}
    report = evaluate_criteria(cfg.evaluation, 1, measuring(values_meeting(cfg, 1), 1, checks))
    assert report.mandatory_passed and report.not_applicable == ["detection_model_loading"]
    assert report.to_dict()["not_applicable"] == ["detection_model_loading"]
