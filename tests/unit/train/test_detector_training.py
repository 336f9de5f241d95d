"""Detector training, both strategies: it learns, resume continues (never restarts), nothing is overwritten.

The earlier implementation called YOLO.train(epochs=1) once per outer epoch: it never progressed, results.csv
was overwritten, resume treated epochs as a total and None metrics crashed comparisons. Each is checked here.
"""
import csv
import math
from pathlib import Path

import pytest

from pillsnap.models.detector import DETECTOR_CLASS_MAP_HASH, load_detector_checkpoint
from pillsnap.train.checkpoints import check_compatible, load_checkpoint
from tests.unit.detection_support import (INT_CRASH_AT_STEP, INT_EPOCHS, SEQ_CRASH_AFTER, SEQ_EPOCHS,  # noqa: F401
                                          SEQ_STEPS_PER_EPOCH,
                                          SimulatedInterruption, det_config, det_data, interleaved_run, mean,
                                          sequential_run)

pytestmark = pytest.mark.slow


def test_sequential_learns(sequential_run):  # noqa: F811
    losses = sequential_run.losses["detector"]
    assert len(losses) == SEQ_EPOCHS * SEQ_STEPS_PER_EPOCH  # every batch of every epoch exactly once
    assert mean(losses[-5:]) < 0.7 * mean(losses[:5])
    history = sequential_run.result.history
    assert history[-1]["train"]["box_loss"] < history[0]["train"]["box_loss"]
    assert sequential_run.result.best_metric > 0.1  # mAP@0.5 on the val images


def test_sequential_resume_continues_the_epochs(sequential_run):  # noqa: F811
    r = sequential_run.result
    assert isinstance(sequential_run.first_error, SimulatedInterruption)
    assert sequential_run.epochs_after_resume == list(range(SEQ_CRASH_AFTER + 1, SEQ_EPOCHS + 1))
    assert r.resumed and r.epochs_completed == r.epochs_planned == SEQ_EPOCHS and not r.stopped_early
    assert [h["epoch"] for h in r.history] == list(range(1, SEQ_EPOCHS + 1))
    total = SEQ_EPOCHS * SEQ_STEPS_PER_EPOCH
    assert sequential_run.steps == list(range(1, total + 1)) and r.global_step == total
    runs = sorted(p.name for p in Path(r.run_dir).parent.iterdir())
    assert runs == ["run001"], "the resume continued in place, no second run"
    with open(Path(r.run_dir) / "results.csv") as f:
        epochs = [int(float(row["epoch"])) for row in csv.DictReader(f)]
    assert epochs == list(range(1, SEQ_EPOCHS + 1)), "results.csv appended, never overwritten"
    for record in r.history:  # metrics complete: numbers, NaN-safe, never None
        assert all(isinstance(v, float) and math.isfinite(v) for v in record["val"].values())


def test_sequential_checkpoints_use_our_schema(sequential_run):  # noqa: F811
    r = sequential_run.result
    best, last = load_checkpoint(r.best_checkpoint), load_checkpoint(r.last_checkpoint)
    for payload in (best, last):
        check_compatible(payload, "yolo11n-relu", 1, DETECTOR_CLASS_MAP_HASH)
    assert last["epoch"] == SEQ_EPOCHS and best["epoch"] == r.best_epoch
    assert best["best_metric"] == pytest.approx(r.best_metric)
    model = load_detector_checkpoint(r.best_checkpoint)
    assert model.yaml["scale"] == "n" and model.yaml["activation"] == "nn.ReLU()"
    assert r.as_dict()["val_metrics"]["mAP_0.5"] == pytest.approx(r.best_metric)


def test_a_finished_run_is_returned_not_retrained(sequential_run, det_data):  # noqa: F811
    from pillsnap.train.detector import train_detector

    again = train_detector(det_config(sequential_run.exp_dir, "train.strategy=sequential"), det_data.manifest, 1,
                           step_hook=lambda *a: pytest.fail("trained again"), show_progress=False)
    assert again.as_dict() == sequential_run.result.as_dict()


def test_interleaved_trains_both_models(interleaved_run):  # noqa: F811
    det, cls = interleaved_run.losses["detector"], interleaved_run.losses["classifier"]
    assert mean(det[-3:]) < 0.7 * mean(det[:3])
    assert mean(cls[-4:]) < mean(cls[:4])
    r = interleaved_run.result
    assert r.extra["ratio"] == [1, 1] and r.extra["epochs_seen"] == {"detector": INT_EPOCHS,
                                                                     "classifier": INT_EPOCHS}
    assert all(math.isfinite(h["val"]["mAP_0.5"]) and math.isfinite(h["classifier"]["val"]["accuracy"])
               for h in r.history)


def test_interleaved_resume_continues_at_the_same_global_step(interleaved_run):  # noqa: F811
    r = interleaved_run.result
    steps = interleaved_run.steps
    crash = steps.index(INT_CRASH_AT_STEP)
    # recovery.pt every 4 steps: the newest valid checkpoint before the crash at step 10 is step 8
    assert steps[:crash + 1] == list(range(1, INT_CRASH_AT_STEP + 1))
    assert steps[crash + 1:] == list(range(9, r.extra["total_steps"] + 1))
    assert r.resumed and r.global_step == r.extra["total_steps"] == INT_EPOCHS * 6
    assert [h["epoch"] for h in r.history] == list(range(1, INT_EPOCHS + 1))
    assert interleaved_run.epochs_after_resume == list(range(2, INT_EPOCHS + 1))


def test_interleaved_checkpoint_holds_both_models(interleaved_run):  # noqa: F811
    r = interleaved_run.result
    last = load_checkpoint(r.last_checkpoint)
    check_compatible(last, "yolo11n-leaky_relu", 1, DETECTOR_CLASS_MAP_HASH)
    assert last["strategy"] == "interleaved" and last["global_step"] == r.global_step
    classifier = last["classifier"]
    assert classifier["backbone"] == "test_efficientnet" and classifier["num_classes"] == 6
    assert {"model", "optimizer", "scheduler", "scaler", "stream"} <= set(classifier)
    best_cls = load_checkpoint(r.extra["classifier"]["best_checkpoint"])
    check_compatible(best_cls, "test_efficientnet", 6, r.extra["classifier"]["class_map_hash"])
    assert load_detector_checkpoint(r.best_checkpoint).yaml["activation"] == "nn.LeakyReLU(0.1)"


def test_interleaved_needs_both_models_in_the_ratio(det_data, tmp_path):  # noqa: F811
    from pillsnap.data.class_map import build_class_map
    from pillsnap.train.detector import train_detector

    cfg = det_config(tmp_path, "train.strategy=interleaved", "train.interleave_ratio=[1,0]")
    with pytest.raises(ValueError, match="interleave_ratio"):
        train_detector(cfg, det_data.manifest, 1, class_map=build_class_map(det_data.manifest))
