"""The training fingerprint is an include-list: what training computes is in it, serving and reporting are not."""
import pytest

from pillsnap.config import load_config, to_dict
from pillsnap.train.services.checkpoint_policy import (RUN_CONTROL_KEYS, TRAINING_KEYS, improved, pick,
                                                       training_fingerprint)


def _fingerprint(*overrides, plans=None):
    return training_fingerprint(to_dict(load_config(profile="ci", overrides=list(overrides))), plans)


def test_every_listed_key_exists_and_each_run_control_key_lies_inside_a_training_section():
    config = to_dict(load_config(profile="ci"))
    for key in (*TRAINING_KEYS, *RUN_CONTROL_KEYS):
        pick(config, key)  # a KeyError names a key the schema does not have
    assert all(any(k.startswith(section + ".") for section in TRAINING_KEYS) for k in RUN_CONTROL_KEYS)


@pytest.mark.parametrize("override", ["serve.smoke_requests=5", "evaluation.checks.multi_batch_size=4",
                                      "export.parity_samples=3", "inference.mode=single", "logging.tensorboard=false",
                                      "orchestration.interactive_review=true", "train.crash_at_step=7",
                                      "train.oom.inject_at_steps=[3]", "train.step_log_interval=1",
                                      "paths.exp_dir=elsewhere", "dataloader.num_workers=3"])
def test_serving_reporting_and_run_control_keys_leave_it_unchanged(override):
    assert _fingerprint(override) == _fingerprint()


@pytest.mark.parametrize("override", ["train.classification.lr=0.5", "train.detection.grad_clip=3.0",
                                      "augment.rotate_degrees=10", "loss.label_smoothing=0.0",
                                      "optimization.amp=true", "detection.conf_threshold=0.4",
                                      "classification.image_size=48", "train.oom.max_grad_accum=2"])
def test_what_training_computes_changes_it(override):
    assert _fingerprint(override) != _fingerprint()


def test_a_batch_plan_changes_it():
    plan = {"batch_size": 4, "grad_accum": 2, "probed": True}
    assert _fingerprint(plans={"classifier": plan}) != _fingerprint(plans={"classifier": {**plan, "grad_accum": 1}})


def test_the_data_a_run_trains_on_changes_it():
    data = {"subset": "a1", "detector": {"detector_images": 60, "val_fraction": 0.15}, "warm_start": {}}
    changed = [{**data, "subset": "b2"}, {**data, "detector": {"detector_images": 24, "val_fraction": 0.15}},
               {**data, "warm_start": {"classifier": "ffee"}}]
    assert len({training_fingerprint(to_dict(load_config(profile="ci")), None, d) for d in (data, *changed)}) == 4


def test_the_one_improvement_rule():
    assert improved(0.5, None) and improved(0.5, 0.5) and not improved(0.4, 0.5)
    assert improved(0.4, 0.5, mode="min") and not improved(0.5, 0.45, min_delta=0.1)
    assert not improved(float("nan"), 0.1) and not improved(None, 0.1) and improved(0.1, float("nan"))
