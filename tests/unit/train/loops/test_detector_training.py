"""Detector training in the one engine, both strategies: it learns, resume continues (never restarts), nothing is
overwritten, metrics are complete.

The earlier implementation called YOLO.train(epochs=1) once per outer epoch: it never progressed, results.csv
was overwritten, resume treated epochs as a total and None metrics crashed comparisons. Each is checked here.
"""
import json
import math

import pytest

from pillsnap.core.checkpoints import check_compatible, load_checkpoint
from pillsnap.models.detector import DETECTOR_CLASS_MAP_HASH, load_detector_checkpoint
from tests.unit.detection_support import (INT_CRASH_AT_STEP, INT_EPOCHS, SEQ_CRASH_AFTER, SEQ_EPOCHS,  # noqa: F401
                                          SEQ_STEPS_PER_EPOCH, SimulatedInterruption, _train, det_config, det_data,
                                          interleaved_run, mean, sequential_run)

pytestmark = pytest.mark.slow


def test_sequential_learns(sequential_run):  # noqa: F811
    losses = sequential_run.losses["detector"]
    assert len(losses) == SEQ_EPOCHS * SEQ_STEPS_PER_EPOCH  # every batch of every epoch exactly once
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5])
    det = sequential_run.result["detector"]
    assert det.history[-1]["train"]["box_loss"] < det.history[0]["train"]["box_loss"]
    assert det.best_metric > 0.1  # mAP@0.5 on the val images
    assert sequential_run.result["classifier"].epochs_completed == 2  # then the classifier, in the same loop


def test_sequential_resume_continues_the_epochs(sequential_run):  # noqa: F811
    r = sequential_run.result["detector"]
    assert isinstance(sequential_run.first_error, SimulatedInterruption)
    assert sequential_run.epochs_after_resume == list(range(SEQ_CRASH_AFTER + 1, SEQ_EPOCHS + 1))
    assert r.resumed_from_step == SEQ_CRASH_AFTER * SEQ_STEPS_PER_EPOCH
    assert r.epochs_completed == r.epochs_planned == SEQ_EPOCHS and not r.stopped_early
    assert [h["epoch"] for h in r.history] == list(range(1, SEQ_EPOCHS + 1))
    total = SEQ_EPOCHS * SEQ_STEPS_PER_EPOCH
    assert sequential_run.steps == list(range(1, total + 1)) and r.global_step == total
    metrics = json.loads((sequential_run.exp_dir / "stage_1/reports/metrics.json").read_text())
    assert [h["epoch"] for h in metrics["detection"]["history"]] == list(range(1, SEQ_EPOCHS + 1))  # appended
    for record in r.history:  # metrics complete: numbers, NaN-safe, never None
        values = [record["val"][k] for k in ("mAP_0.5", "mAP_0.5_0.95", "precision", "recall")]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values) and not record["val"]["not_measured"]


def test_sequential_checkpoints_use_our_schema(sequential_run):  # noqa: F811
    r = sequential_run.result["detector"]
    best, last = load_checkpoint(r.best_checkpoint), load_checkpoint(r.last_checkpoint)
    for payload in (best, last):
        check_compatible(payload, "yolo11n-relu", 1, DETECTOR_CLASS_MAP_HASH)
    assert last["epoch"] == SEQ_EPOCHS and best["epoch"] == r.best_epoch
    assert best["best_metric"] == pytest.approx(r.best_metric)
    model = load_detector_checkpoint(r.best_checkpoint)
    assert model.yaml["scale"] == "n" and model.yaml["activation"] == "nn.ReLU()"
    assert r.as_dict()["val_metrics"]["mAP_0.5"] == pytest.approx(r.best_metric)


def test_a_finished_run_is_returned_not_retrained(sequential_run, det_data):  # noqa: F811
    cfg = det_config(sequential_run.exp_dir, "train.strategy=sequential", "train.classification.epochs=2")
    again = _train(cfg, det_data, sequential_run.exp_dir, step_hook=lambda *a: pytest.fail("trained again"))
    for model, result in again.items():
        first = sequential_run.result[model].as_dict()
        assert {**result.as_dict(), "resumed_from_step": None} == {**first, "resumed_from_step": None}, model


def test_interleaved_trains_both_models(interleaved_run):  # noqa: F811
    det, cls = interleaved_run.losses["detector"], interleaved_run.losses["classifier"]
    assert mean(det[-3:]) < 0.7 * mean(det[:3])
    assert mean(cls[-4:]) < mean(cls[:4])
    r = interleaved_run.result
    assert r["detector"].epochs_completed == r["classifier"].epochs_completed == INT_EPOCHS
    assert all(math.isfinite(h["val"]["mAP_0.5"]) for h in r["detector"].history)
    assert all(math.isfinite(h["val"]["accuracy"]) for h in r["classifier"].history)


def test_interleaved_resume_continues_at_the_same_tick(interleaved_run):  # noqa: F811
    r = interleaved_run.result
    steps = interleaved_run.steps
    crash = steps.index(INT_CRASH_AT_STEP)
    # recovery.pt every 4 ticks: the newest valid checkpoint before the crash at tick 10 is tick 8
    assert steps[:crash + 1] == list(range(1, INT_CRASH_AT_STEP + 1))
    total = r["detector"].global_step + r["classifier"].global_step
    assert steps[crash + 1:] == list(range(9, total + 1))
    assert r["classifier"].resumed_from_step == 8
    assert [h["epoch"] for h in r["detector"].history] == list(range(1, INT_EPOCHS + 1))


def test_interleaved_checkpoints_hold_both_models(interleaved_run):  # noqa: F811
    r = interleaved_run.result
    last = load_checkpoint(r["classifier"].last_checkpoint)
    check_compatible(last, "test_efficientnet", 6, r["classifier"].class_map_hash)
    assert last["strategy"] == "interleaved" and {"classifier", "detector"} == set(last["units"])
    assert {"model", "optimizer", "scheduler", "scaler", "meta_json"} <= set(last["units"]["detector"])
    check_compatible(load_checkpoint(r["detector"].best_checkpoint), "yolo11n-leaky_relu", 1, DETECTOR_CLASS_MAP_HASH)
    assert load_detector_checkpoint(r["detector"].best_checkpoint).yaml["activation"] == "nn.LeakyReLU(0.1)"


def test_interleaved_needs_both_models_in_the_ratio(det_data, tmp_path):  # noqa: F811
    cfg = det_config(tmp_path, "train.strategy=interleaved", "train.interleave_ratio=[1,0]")
    with pytest.raises(ValueError, match="interleave_ratio"):
        _train(cfg, det_data, tmp_path)
