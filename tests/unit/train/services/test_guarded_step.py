"""OOM recovery inside the loops (D-8), both strategies and both models, by fault injection on CPU.

On CPU, S1 (fp16 escalation) is recorded in the OOM state but autocast stays off, so it cannot change the math;
S2 splits each window into micro-batches. BatchNorm sees micro-batches either way, so the exact reference for
"S1 then S2 at step 1" is a run configured at the micro-batch size and accumulation directly.
"""
import json
import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.train import SimulatedCrash
from pillsnap.train.services.loss_monitors import NonFiniteLossError
from pillsnap.train.services.oom_state_machine import AMP_FP16, EMERGENCY_EXIT, GLOBAL_BATCH_CHANGE, MICROBATCHING, FaultInjector
from pillsnap.train.services.guarded_step import OomExhaustedError
from pillsnap.train.services.schedule import SampleProgressFactor
from tests.unit.train.support import RepeatedOom, STRATEGIES, assert_same_weights, final_weights, run

pytestmark = pytest.mark.slow
SHORT = ("train.classification.epochs=1", "train.detection.epochs=1", "train.max_steps_per_epoch=3",
         "train.oom.cooldown_sec=0")
MICRO = ("train.classification.batch_size=4", "train.detection.batch_size=2", "train.grad_accum_steps=2")
# S1 switches autocast to fp16 with a GradScaler on a CPU as on a GPU: the reference trains so from the start.
FP16 = ("optimization.amp=true", "optimization.amp_dtype=fp16")


def _injectors(step=1, times=2):
    return {m: RepeatedOom(step, times) for m in ("classifier", "detector")}


def _tb_scalars(tb_dir):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def micro_reference(make_config, tmp_path_factory, tiny_stage):
    """Final weights of uninjected runs configured at the micro-batch, per strategy."""
    out = {}
    for strategy in STRATEGIES:
        tmp = tmp_path_factory.mktemp(f"micro_{strategy}")
        results = run(make_config, tmp, tiny_stage, strategy, *SHORT, *MICRO, *FP16)
        out[strategy] = (final_weights(tmp / "stage_1"), results)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_s1_then_s2_keep_the_global_batch_and_match_a_run_configured_at_the_micro_batch(
        make_config, tmp_path, tiny_stage, micro_reference, caplog, strategy):
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        results = run(make_config, tmp_path, tiny_stage, strategy, *SHORT, injectors=_injectors())
    ref_weights, ref_results = micro_reference[strategy]
    for model, result in results.items():
        assert [e["action"] for e in result.oom_events] == [AMP_FP16, MICROBATCHING], model
        assert result.oom_events[0]["autocast"] == "fp16 + GradScaler"
        assert "grad_scaler=True" in ref_results[model].policy
        assert all(e["model"] == model for e in result.oom_events)
        assert result.global_step == ref_results[model].global_step
    # The micro-batch the OOM state settled on; the global batch of 8 is kept.
    assert (results["classifier"].batch_size, results["classifier"].grad_accum) == (4, 2)
    # The failed attempts ran forward/backward (BatchNorm statistics, gradients): the replay undid all of it.
    assert_same_weights(final_weights(tmp_path / "stage_1"), ref_weights)
    scalars = _tb_scalars(tmp_path / "stage_1" / "tb")
    assert scalars["oom/retries"] == [1.0, 2.0] and scalars["oom/global_batch"] == [8.0, 8.0]
    assert scalars["oom/batch_size"] == [8.0, 4.0]
    det = _tb_scalars(tmp_path / "stage_1" / "detector" / "tb")
    assert det["oom/batch_size"] == [4.0, 2.0] and det["oom/global_batch"] == [4.0, 4.0]
    lines = [r.getMessage() for r in caplog.records]
    assert any("OOM recovery S2 (retry 2): micro-batching bs=2 accum=2 (global batch preserved: 4)" in x
               for x in lines)
    assert any(x.startswith("detector: OOM event at step 1 recorded") for x in lines)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_keeps_the_reduced_batch_and_stays_exact(make_config, tmp_path, tiny_stage, micro_reference,
                                                        strategy):
    crash = "train.crash_at_step=4" if strategy == "interleaved" else "train.crash_at_step=3"
    with pytest.raises(SimulatedCrash):
        run(make_config, tmp_path, tiny_stage, strategy, *SHORT, crash, injectors=_injectors())
    saved = load_checkpoint(tmp_path / "stage_1/checkpoints/recovery.pt")
    oom_state = json.loads(saved["units"]["classifier"]["oom_state_json"])
    assert (oom_state["batch_size"], oom_state["grad_accum"]) == (4, 2)
    resumed = run(make_config, tmp_path, tiny_stage, strategy, *SHORT, crash)
    assert resumed["classifier"].resumed_from_step == (4 if strategy == "interleaved" else 2)  # recovery.pt ticks
    assert [e["action"] for e in resumed["classifier"].oom_events] == [AMP_FP16, MICROBATCHING]
    assert_same_weights(final_weights(tmp_path / "stage_1"), micro_reference[strategy][0])


def test_s3_scales_lr_by_the_global_batch_ratio_and_replays_the_same_samples(make_config, tmp_path, tiny_stage):
    # max_grad_accum=1: halving the batch cannot keep the global batch, so the first OOM is S3 (8 -> 4).
    seen, lrs = [], []
    from pillsnap.train.services.guarded_step import StepGuard

    real_step = StepGuard.step

    def recording_step(guard, window, step_number, epoch, emergency):
        lr = guard.unit.lr  # the LR this step trains with
        loss = real_step(guard, window, step_number, epoch, emergency)
        if loss is not None:
            seen.extend(int(i) for b in window for i in b["indices"])
            lrs.append(lr)
        return loss

    StepGuard.step = recording_step
    try:
        result = run(make_config, tmp_path, tiny_stage, "sequential", *SHORT, "train.oom.max_grad_accum=1",
                     "train.oom.escalate_to_fp16=false", "train.oom.inject_at_steps=[2]",
                     "train.warmup_steps=0", models=("classifier",))["classifier"]
    finally:
        StepGuard.step = real_step
    (event,) = result.oom_events
    assert event["action"] == GLOBAL_BATCH_CHANGE and event["G_old"] == 8 and event["G_new"] == 4
    assert event["lr_after"] == event["lr_before"] * 0.5 and event["base_lrs"] == [0.003 * 0.5]
    assert event["weight_decay"] == pytest.approx(0.05) and event["schedule"] == "by_samples"
    # 3 planned steps of 8 = 24 samples: 1 step of 8, then the refused window replayed as 4 steps of 4.
    assert result.global_step == 5 and (result.batch_size, result.grad_accum) == (4, 1)
    from pillsnap.data.datasets import EpochSampler

    assert seen == EpochSampler(48, 42).order().tolist()[:24]
    reference = SampleProgressFactor(3, 0, reference_global_batch=8)  # the planned 3 steps of 8
    expected = [0.003 * reference(0)] + [0.003 * 0.5 * reference(pos) for pos in (1, 1.5, 2, 2.5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_detector_s3_re_feeds_its_samples_in_either_strategy(make_config, tmp_path, tiny_stage, strategy):
    results = run(make_config, tmp_path, tiny_stage, strategy, *SHORT, "train.oom.max_grad_accum=1",
                  "train.oom.escalate_to_fp16=false", "train.oom.inject_detector_at_steps=[1]")
    det = results["detector"]
    (event,) = det.oom_events
    assert event["action"] == GLOBAL_BATCH_CHANGE and (event["G_old"], event["G_new"]) == (4, 2)
    assert det.global_step == 2 and det.batch_size == 2 and det.epochs_completed == 1  # 4 samples as 2 x 2
    assert results["classifier"].oom_events == [] and results["classifier"].global_step == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exhausted_recovery_leaves_an_emergency_checkpoint_and_a_clear_error(make_config, tmp_path, tiny_stage,
                                                                             strategy):
    model = "detector" if strategy == "interleaved" else "classifier"
    key = "train.oom.inject_detector_at_steps" if model == "detector" else "train.oom.inject_at_steps"
    config_key = "train.detection" if model == "detector" else "train.classification"
    with pytest.raises(OomExhaustedError, match=rf"exhausted after 3 retries.*max_retries=2.*emergency\.pt.*"
                                                rf"{config_key}\.batch_size"):
        run(make_config, tmp_path, tiny_stage, strategy, *SHORT, "train.oom.max_retries=2", f"{key}=[1]",
            injectors={model: RepeatedOom(1, 3)})
    emergency = load_checkpoint(tmp_path / "stage_1/checkpoints/emergency.pt")
    assert json.loads(emergency["units"][model]["oom_state_json"])["retries"] == 3
    meta = json.loads(emergency["units"][model]["meta_json"])
    assert [e["action"] for e in meta["oom_events"]] == [AMP_FP16, MICROBATCHING, EMERGENCY_EXIT]


def test_non_finite_loss_saves_an_emergency_checkpoint_and_names_step_and_batch(make_config, tmp_path, tiny_stage,
                                                                               monkeypatch):
    from pillsnap.train.units.classifier import ClassifierUnit

    real, calls = ClassifierUnit.loss, []

    def poisoned(unit, batch):
        calls.append(1)
        loss = real(unit, batch)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(ClassifierUnit, "loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 2 \(batch: .*'images': \[") as info:
        run(make_config, tmp_path, tiny_stage, "sequential", *SHORT, models=("classifier",))
    assert info.value.step == 2 and len(info.value.batch_info["images"]) == 8
    emergency = load_checkpoint(tmp_path / "stage_1/checkpoints/emergency.pt")
    assert emergency["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in emergency["model"].values() if v.dtype.is_floating_point)


def test_an_oom_after_unscale_with_an_enabled_grad_scaler_replays_cleanly(make_config, tmp_path, tiny_stage,
                                                                          monkeypatch):
    # An OOM inside clip_grad_norm_ comes after scaler.unscale_: without a reset the replay's unscale_ raises.
    from pillsnap.train.units.classifier import ClassifierUnit

    real_init = ClassifierUnit.__init__

    def with_scaler(unit, *args, **kwargs):
        real_init(unit, *args, **kwargs)
        unit.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as under fp16 autocast on CUDA

    monkeypatch.setattr(ClassifierUnit, "__init__", with_scaler)
    real_clip, failures = torch.nn.utils.clip_grad_norm_, []

    def clip_once_oom(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (inside clip_grad_norm_)")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_once_oom)
    result = run(make_config, tmp_path, tiny_stage, "sequential", *SHORT, "train.oom.escalate_to_fp16=false",
                 "train.max_steps_per_epoch=2", models=("classifier",))["classifier"]
    assert [e["action"] for e in result.oom_events] == [MICROBATCHING] and result.global_step == 2


def test_fault_injection_fires_once_per_step():
    injector = FaultInjector.from_steps([3])
    injector.maybe_raise(2)
    with pytest.raises(torch.OutOfMemoryError):
        injector.maybe_raise(3)
    injector.maybe_raise(3)  # the replay succeeds
    assert injector.fired == [3]
