"""The stage's typed results: built once from what the tasks returned, nothing filled in that was not measured."""
import json
import math

import pytest

from pillsnap.config import load_config
from pillsnap.evaluate.criteria import evaluate_criteria
from pillsnap.evaluate.results import METRICS, StageResults, Status, stage_results


def _epoch(loss, memory, steps=10):
    return {"epoch": 1, "train_loss": loss, "steps": steps, "samples": 80, "data_time_s": 0.02,
            "compute_time_s": 0.2, "host_private_mb": memory, "gpu_peak_mb": None}


EVALUATION = {"accuracy": 0.81, "macro_f1": 0.8, "top5": 0.97, "n": 2100, "class_coverage": 0.9,
              "latency_p95_ms": 40.0, "inference_time_ms": 7.0, "multi_batch": {"batch_size": 32},
              "previous_stage_val": {"accuracy": 0.79, "photos": 800}, "worst_classes": [{"class": "K-1", "f1": 0.2}]}
CLASSIFIER = {"mean_throughput": 120.0, "batch_size": 32, "auto_batch": {"probed": True},
              "val_metrics": {"val_loss": 0.6}, "oom_events": [{"action": "amp_fp16"}],
              "epochs": [_epoch(x, m) for x, m in ((2.0, 900), (1.2, 950), (0.90, 960), (0.86, 955), (0.84, 958))]}
DETECTOR = {"oom_events": [{"action": "microbatching"}], "epochs": [_epoch(5.0, 900)]}
DETECTION = {"mAP_0.5": 0.95, "mAP_0.5_0.95": 0.7, "precision": 0.9, "recall": 0.93, "inference_time_ms": 30.0,
             "combination": {"pipeline_latency": {"p95": 95.0}}}
API = {"p95_ms": 50.0, "throughput_img_s": 44.0, "requests": 48, "errors": 1, "device": "cpu"}
VALIDATION = {"counts": {"images": 1000}, "findings": {"unreadable_image": 3, "size_mismatch": 2, "duplicate": 9}}
CHECKS = {"multi_batch_processing": "pass", "memory_leak_test": "pass", "no_crashes": "pass"}


def _build(**changes):
    parts = dict(evaluation=EVALUATION, trained={"classifier": CLASSIFIER, "detector": DETECTOR},
                 validation=VALIDATION, subset={"imbalance_ratio": 3.5}, checks=CHECKS, detection=DETECTION, api=API)
    parts.update(changes)
    return stage_results(2, **parts)


def test_every_figure_comes_from_the_stage_s_own_results():
    r = _build()
    assert (r.classifier.accuracy, r.classifier.n, r.classifier.previous_stage_accuracy) == (0.81, 2100, 0.79)
    assert r.classifier.multi_batch_size == 32 and r.detector.map50 == 0.95 and r.pipeline_latency_p95_ms == 95.0
    assert r.api.success_pct == pytest.approx(100 * 47 / 48) and r.training.repeated_oom == 2
    assert r.training.batch_size_achieved == 32 and r.training.loss == 0.6 and r.training.gpu_memory_gb is None
    assert r.data.corruption_rate == pytest.approx(0.005) and r.data.class_imbalance_ratio == 3.5
    assert r.training.loss_variance == pytest.approx(((0.9 - 0.8667) ** 2 + (0.86 - 0.8667) ** 2 +
                                                      (0.84 - 0.8667) ** 2) / 3, rel=1e-2)
    assert r.training.memory_peak_to_avg == pytest.approx(960 / 944.6, rel=1e-3)
    assert r.training.memory_stable_hours == pytest.approx(5 * 10 * 0.22 / 3600 + 10 * 0.22 / 3600)
    assert r.check("no_crashes") == Status.PASS and r.check("memory_stable") == Status.NOT_MEASURED


def test_the_api_success_share_counts_the_planned_requests():
    """Issue 28 point 8: 14 of 48 planned requests were sent before the time budget ran out and all answered: that
    is 29 %, not 100 %."""
    r = _build(api={**API, "planned": 48, "requests": 14, "unsent": 34, "errors": 0})
    assert r.api.success_pct == pytest.approx(100 * 14 / 48)


def test_what_was_not_measured_stays_none():
    r = _build(detection=None, api=None, checks={"multi_batch_processing": "fail", "memory_leak_test": "not_measured"},
               trained={"classifier": {**CLASSIFIER, "auto_batch": None, "epochs": CLASSIFIER["epochs"][:1]}},
               validation={})
    assert r.detector is None and r.api is None and r.classifier.multi_batch_size is None
    assert r.pipeline_latency_p95_ms == 40.0  # without a detector the single-photo pipeline is the pipeline
    assert r.training.batch_size_achieved is None and r.training.loss_variance is None
    assert r.training.memory_peak_to_avg is None and r.training.memory_stable_hours is None
    assert r.data.corruption_rate is None
    for name in ("detection.mAP_0.5", "production.api_success_pct", "scalability.multi_batch_size"):
        assert r.metric(name) is None, name
    with pytest.raises(KeyError, match="no measurement named 'detection.mAP50'"):
        r.metric("detection.mAP50")


def test_it_crosses_the_task_boundary_as_a_dict_and_back():
    r = _build()
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["checks"]["no_crashes"] == "pass"
    assert StageResults.from_dict(doc) == r
    assert all(StageResults.from_dict(doc).metric(name) == r.metric(name) for name in METRICS)


def test_an_unsettled_training_loss_fails_the_stability_target_and_a_leak_counts_no_stable_hours():
    cfg = load_config()
    jumpy = [_epoch(x, 900) for x in (2.0, 1.0, 0.2, 1.5, 0.1, 1.6)]
    r = _build(trained={"classifier": {**CLASSIFIER, "epochs": jumpy}},
               checks={**CHECKS, "memory_leak_test": "fail"})
    assert r.training.loss_variance > 0.1 and r.training.memory_stable_hours == 0.0
    row = next(a for a in evaluate_criteria(cfg.evaluation, 2, r).advanced if a.metric == "advanced.loss_variance")
    assert row.status == Status.FAIL and not math.isnan(row.measured)
