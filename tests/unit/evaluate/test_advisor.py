"""D-14 OptimizationAdvisor: levels from crafted results, critical failures, structured suggestions."""
import copy
import json
import math
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from pillsnap.config import PillSnapConfig, load_config
from pillsnap.evaluate.advisor import (
    DATA_CORRUPTION,
    NAN_LOSS,
    OPTION_IDS,
    PROCEED,
    REPEATED_OOM,
    RERUN_OPTIMIZED,
    STOP,
    OptimizationAdvisor,
)
from pillsnap.evaluate.criteria import RECOMMEND_PROCEED, SUGGEST_OPTIMIZE, WARN_STOP
from tests.unit.evaluate.support import measuring


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def advisor(cfg):
    return OptimizationAdvisor(cfg)


def results_at(cfg, stage, fraction=1.0, checks=None, training=None, data=None, drop=(), classifier=None,
               **values):
    """Every mandatory check passed (or `checks`); every target measured so that the performance score is exactly
    `fraction`, then `values` (target names) and the typed `training` / `data` / `classifier` fields set; `drop`:
    target names left unmeasured."""
    criteria = cfg.evaluation.stages[stage]
    targets = {t.metric: t.value * fraction if t.op == ">=" else t.value / fraction for t in criteria.targets}
    measured = measuring({k: v for k, v in {**targets, **values}.items() if k not in drop}, stage,
                         checks or {name: "pass" for name in criteria.mandatory_checks})
    return replace(measured, training=replace(measured.training, **(training or {})),
                   data=replace(measured.data, **(data or {})),
                   classifier=replace(measured.classifier, **(classifier or {})))


def suggested(advice):
    return {s.key: s.value for s in advice.suggestions}


@pytest.mark.parametrize(
    "fraction, level, reason, first_option",
    [
        (1.0, RECOMMEND_PROCEED, "all_targets_met", PROCEED),
        (0.8, RECOMMEND_PROCEED, "sufficient_performance", PROCEED),
        (0.6, SUGGEST_OPTIMIZE, "performance_below_target", RERUN_OPTIMIZED),
        (0.3, WARN_STOP, "performance_too_low", RERUN_OPTIMIZED),
    ],
)
def test_levels_follow_the_performance_score(cfg, advisor, fraction, level, reason, first_option):
    advice = advisor.evaluate_and_recommend(2, results_at(cfg, 2, fraction))
    assert advice.recommendation == level and advice.reason == reason
    assert advice.performance_score == pytest.approx(fraction)
    assert advice.recommended_option == first_option
    assert set(advice.option_ids) <= set(OPTION_IDS) and STOP in advice.option_ids


def test_proceed_is_offered_unless_performance_is_too_low(cfg, advisor):
    risky = advisor.evaluate_and_recommend(2, results_at(cfg, 2, 0.6))
    assert PROCEED in risky.option_ids and "risky" in risky.options[1].label
    too_low = advisor.evaluate_and_recommend(2, results_at(cfg, 2, 0.3))
    assert too_low.option_ids == [RERUN_OPTIMIZED, STOP]
    assert too_low.color == "red"


def test_last_stage_proceeds_to_the_final_test(cfg, advisor):
    advice = advisor.evaluate_and_recommend(4, results_at(cfg, 4))
    assert "final test" in advice.options[0].label


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"training": {"repeated_oom": 6}}, REPEATED_OOM),
        ({"training": {"loss": math.nan}}, NAN_LOSS),
        ({"training": {"loss": math.inf}}, NAN_LOSS),
        ({"data": {"corruption_rate": 0.02}}, DATA_CORRUPTION),
    ],
)
def test_critical_failures_stop_even_when_targets_are_met(cfg, advisor, extra, code):
    advice = advisor.evaluate_and_recommend(1, results_at(cfg, 1, **extra))
    assert advice.recommendation == WARN_STOP and advice.reason == "critical_failure"
    assert [c.code for c in advice.critical_failures] == [code]
    assert advice.recommended_option == STOP and PROCEED not in advice.option_ids


def test_limits_are_not_critical(cfg, advisor):
    advice = advisor.evaluate_and_recommend(1, results_at(cfg, 1, training={"repeated_oom": 5, "loss": 0.3},
                                                          data={"corruption_rate": 0.01}))
    assert advice.critical_failures == [] and advice.recommendation == RECOMMEND_PROCEED


def test_critical_failures_come_with_fixes(cfg, advisor):
    advice = advisor.evaluate_and_recommend(1, results_at(cfg, 1, training={"repeated_oom": 9, "loss": math.nan}))
    fixes = suggested(advice)
    assert fixes["train.classification.batch_size"] == cfg.train.classification.batch_size // 2
    assert fixes["train.grad_accum_steps"] == cfg.train.grad_accum_steps * 2
    assert fixes["train.classification.lr"] == pytest.approx(cfg.train.classification.lr / 2)


def test_failed_or_unmeasured_mandatory_check_stops(cfg, advisor):
    checks = {n: "pass" for n in cfg.evaluation.stages[3].mandatory_checks}
    checks["memory_leak_test"] = "fail"
    del checks["stability_test_pass"]
    advice = advisor.evaluate_and_recommend(3, results_at(cfg, 3, checks=checks))
    assert advice.recommendation == WARN_STOP and advice.reason == "mandatory_checks_failed"
    assert advice.failed_mandatory == ["memory_leak_test", "stability_test_pass"]
    assert advice.option_ids == [RERUN_OPTIMIZED, STOP]


def test_nothing_measured_never_proceeds(cfg, advisor):
    criteria = cfg.evaluation.stages[1]
    advice = advisor.evaluate_and_recommend(1, measuring({}, 1, {n: "pass" for n in criteria.mandatory_checks}))
    assert advice.recommendation == WARN_STOP and advice.reason == "nothing_measured"
    assert advice.performance_score is None


def test_input_bound_run_suggests_more_workers_and_the_cache():
    cfg = load_config(overrides=["dataloader.cache.enabled=false"])
    advisor = OptimizationAdvisor(cfg)
    slow = advisor.evaluate_and_recommend(1, results_at(cfg, 1, **{"system.data_time_s": 0.31, "system.compute_time_s": 0.4}))
    fix = next(s for s in slow.suggestions if s.key == "dataloader.num_workers")
    assert fix.value == 12  # next autotune candidate above the current 8
    assert "data_time 0.310s" in fix.why and fix.as_override() == "dataloader.num_workers=12"
    assert suggested(slow)["dataloader.cache.enabled"] is True
    fast = advisor.evaluate_and_recommend(1, results_at(cfg, 1, **{"system.data_time_s": 0.1, "system.compute_time_s": 0.4}))
    assert "dataloader.num_workers" not in suggested(fast)


def test_low_metrics_and_imbalance_suggestions(cfg, advisor):
    results = results_at(cfg, 2, **{"advanced.class_imbalance_ratio": 25.0, "system.gpu_memory_gb": 15.5,
                                    "classification.accuracy": 0.30,  # < 0.8 × 0.60
                                    "detection.mAP_0.5": 0.20})  # < 0.8 × 0.50
    fixes = suggested(advisor.evaluate_and_recommend(2, results))
    assert fixes["loss.label_smoothing"] == pytest.approx(0.15)
    assert fixes["loss.weighted_sampler"] is True
    assert fixes["loss.use_class_weights"] is True
    assert fixes["train.detection.epochs"] == 75
    assert fixes["train.classification.batch_size"] == 32


def test_imbalance_with_class_weights_on_switches_the_weighting(cfg):
    weighted = copy.deepcopy(cfg)
    weighted.loss.use_class_weights = True
    advice = OptimizationAdvisor(weighted).evaluate_and_recommend(2, results_at(weighted, 2, **{"advanced.class_imbalance_ratio": 25.0}))
    assert suggested(advice) == {"loss.class_weight_mode": "effective_number"}


def test_no_suggestions_when_all_is_well(cfg, advisor):
    advice = advisor.evaluate_and_recommend(2, results_at(cfg, 2, **{"system.data_time_s": 0.01, "system.compute_time_s": 0.2}))
    assert advice.suggestions == []


def test_suggestions_are_valid_config_overrides(cfg, advisor):
    results = results_at(cfg, 2, 0.3, training={"repeated_oom": 8, "loss": math.nan},
                         **{"advanced.class_imbalance_ratio": 30.0, "system.data_time_s": 1.0,
                            "system.compute_time_s": 0.1, "system.gpu_memory_gb": 20.0})
    advice = advisor.evaluate_and_recommend(2, results)
    schema = OmegaConf.structured(PillSnapConfig)
    missing = object()
    assert len(advice.suggestions) >= 6
    for s in advice.suggestions:
        assert OmegaConf.select(schema, s.key, default=missing) is not missing, s.key
    applied = OmegaConf.structured(load_config(overrides=advice.overrides()))
    for s in advice.suggestions:
        assert OmegaConf.select(applied, s.key) == s.value, s.key


def test_worst_classes_are_listed(cfg):
    few = copy.deepcopy(cfg)
    few.evaluation.advisor.worst_classes = 2
    worst = [{"class": "K-000003", "f1": 0.9}, {"class": "K-000001", "f1": 0.05}, {"class": "K-000002", "f1": 0.4}]
    advice = OptimizationAdvisor(few).evaluate_and_recommend(1, results_at(few, 1, classifier={"worst_classes": worst}))
    assert advice.worst_classes == [{"class": "K-000001", "f1": 0.05}, {"class": "K-000002", "f1": 0.4}]


def test_advice_is_data_only(cfg, advisor, capsys):
    advice = advisor.evaluate_and_recommend(2, results_at(cfg, 2, 0.6, **{"system.gpu_memory_gb": 15.0}))
    data = json.loads(json.dumps(advice.to_dict()))
    assert capsys.readouterr().out == ""
    assert data["recommendation"] == SUGGEST_OPTIMIZE and data["color"] == "yellow"
    assert data["overrides"] == [s["override"] for s in data["suggestions"]]
    assert data["criteria"]["performance_score"] == pytest.approx(0.6)
    assert [o["id"] for o in data["options"]] == [RERUN_OPTIMIZED, PROCEED, STOP]


def test_a_user_without_boxes_can_pass_stage_1_with_the_detector_ruled_out():
    """A CSV of ordinary photos trained with detection.enabled=false: 0.98 accuracy, GO. Before, the advisor said
    WARN_STOP forever (detection_model_loading not measured) or scored the detector's targets 0."""
    no_boxes = load_config(overrides=["detection.enabled=false"])
    checks = {n: "pass" for n in no_boxes.evaluation.stages[1].mandatory_checks}
    detector = ("detection.mAP_0.5", "detection.inference_time_ms")
    results = results_at(no_boxes, 1, checks={**checks, "detection_model_loading": "not_applicable"}, drop=detector)
    advice = OptimizationAdvisor(no_boxes).evaluate_and_recommend(1, results)
    assert advice.recommendation == RECOMMEND_PROCEED and advice.reason == "all_targets_met"
    report = advice.criteria.to_dict()
    assert set(report["not_applicable"]) == {"detection_model_loading", "detection.mAP_0.5",
                                             "detection.inference_time_ms"}
    assert report["targets_total"] == 4 and report["targets_measured"] == 4
    # With the shipped config (detector on) the registry says not_measured for a detector nobody probed, and the
    # detector's targets count 0: a missing detector is never ruled out there.
    results = results_at(no_boxes, 1, checks={**checks, "detection_model_loading": "not_measured"}, drop=detector)
    shipped = OptimizationAdvisor(load_config()).evaluate_and_recommend(1, results)
    assert shipped.recommendation == WARN_STOP and "detection_model_loading" in shipped.failed_mandatory
    assert shipped.performance_score == pytest.approx(4 / 6)
