"""OOM recovery inside the classifier loop (D-8), driven by fault injection on CPU with the tiny `ci` profile.

On CPU, S1 (fp16 escalation) is recorded in the OOM state but autocast stays off, so it cannot change the math;
S2 splits each window into micro-batches. BatchNorm sees micro-batches either way, so the exact reference for
"S1 then S2 at step 1" is a run configured at the micro-batch size and accumulation directly.
"""
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pillsnap.train.checkpoints import load_checkpoint
from pillsnap.train.loop import ClassifierTrainer, SimulatedCrash
from pillsnap.train.monitors import NonFiniteLossError
from pillsnap.train.oom import AMP_FP16, EMERGENCY_EXIT, GLOBAL_BATCH_CHANGE, MICROBATCHING
from pillsnap.train.sample_schedule import SampleProgressFactor
from pillsnap.train.schedule import warmup_cosine
from pillsnap.train.steps import OomExhaustedError

SHORT = ("train.deterministic=true", "train.classification.epochs=1", "train.max_steps_per_epoch=3",
         "train.oom.cooldown_sec=0")


class RepeatedOom:
    """Raises a synthetic OOM `times` times at one global step (FaultInjector fires once per step)."""

    def __init__(self, step: int, times: int):
        self.step, self.left = step, times

    def maybe_raise(self, global_step: int) -> None:
        if global_step == self.step and self.left:
            self.left -= 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (test injection at step {global_step})")


def _trainer(make_config, tmp_path, tiny_stage, *overrides, out="run", **kwargs):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path / out, *SHORT, *overrides)
    labels = cmap.restrict(m.loc[m.kind == "single", "k_code"])
    return ClassifierTrainer(cfg, m, labels, tmp_path / out, show_progress=False, **kwargs)


def _tb_scalars(tb_dir):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def micro_reference(make_config, tmp_path_factory, tiny_stage):
    """Weights of an uninjected run configured at batch 4 x accumulation 2 (global batch 8)."""
    tmp = tmp_path_factory.mktemp("micro_ref")
    t = _trainer(make_config, tmp, tiny_stage, "train.classification.batch_size=4", "train.grad_accum_steps=2")
    result = t.run()
    return {k: v.clone() for k, v in t.model.state_dict().items()}, result


def test_s1_then_s2_keep_global_batch_and_match_a_run_configured_at_the_micro_batch(
        make_config, tmp_path, tiny_stage, micro_reference):
    ref_weights, ref_result = micro_reference
    t = _trainer(make_config, tmp_path, tiny_stage, fault_injector=RepeatedOom(step=1, times=2))
    result = t.run()
    assert [e["action"] for e in result.oom_events] == [AMP_FP16, MICROBATCHING]
    assert result.oom_events[0]["autocast"] == "unchanged on cpu"  # S1 on CPU: recorded, math unchanged
    st = t.oom.state
    assert (st.batch_size, st.grad_accum, st.global_batch, st.amp_dtype) == (4, 2, 8, "fp16")
    assert (result.batch_size, result.grad_accum) == (8, 1)  # the loader keeps the global batch of 8
    assert result.global_step == ref_result.global_step == 3
    # The failed attempt ran a forward/backward (BatchNorm statistics, gradients): the replay undid all of it.
    for key, value in ref_weights.items():
        assert torch.equal(t.model.state_dict()[key], value), key
    assert result.history[-1]["train_loss"] == ref_result.history[-1]["train_loss"]
    scalars = _tb_scalars(tmp_path / "run" / "tb")
    assert scalars["oom/retries"] == [1.0, 2.0] and scalars["oom/global_batch"] == [8.0, 8.0]
    assert scalars["oom/batch_size"] == [8.0, 4.0]


def test_resume_keeps_the_reduced_batch_and_stays_exact(make_config, tmp_path, tiny_stage, micro_reference):
    crashing = _trainer(make_config, tmp_path, tiny_stage, "train.crash_at_step=3",
                        fault_injector=RepeatedOom(step=1, times=2))
    with pytest.raises(SimulatedCrash):
        crashing.run()
    saved = load_checkpoint(tmp_path / "run/checkpoints/recovery.pt")
    assert saved["oom_state"]["batch_size"] == 4 and saved["oom_state"]["grad_accum"] == 2
    resumed = _trainer(make_config, tmp_path, tiny_stage, "train.crash_at_step=3")
    result = resumed.run()
    assert result.resumed_from_step == 2 and resumed.oom.state.global_batch == 8
    assert (resumed.oom.state.batch_size, resumed.oom.state.retries) == (4, 2)
    assert [e["action"] for e in result.oom_events] == [AMP_FP16, MICROBATCHING]
    ref_weights, _ = micro_reference
    for key, value in ref_weights.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_s3_scales_lr_by_the_global_batch_ratio_and_replays_the_same_samples(make_config, tmp_path, tiny_stage):
    # max_grad_accum=1: halving the batch cannot keep the global batch, so the first OOM is S3 (8 -> 4).
    t = _trainer(make_config, tmp_path, tiny_stage, "train.oom.max_grad_accum=1", "train.oom.escalate_to_fp16=false",
                 "train.oom.inject_at_steps=[2]", "train.warmup_steps=0")
    seen, lrs = [], []
    real_step = t.train_step

    def recording_step(window):
        lr = t.optimizer.param_groups[0]["lr"]  # the LR this step trains with
        loss = real_step(window)
        if loss is not None:
            seen.extend(int(i) for b in window for i in b[2])
            lrs.append(lr)
        return loss

    t.train_step = recording_step
    result = t.run()
    (event,) = result.oom_events
    assert event["action"] == GLOBAL_BATCH_CHANGE and event["G_old"] == 8 and event["G_new"] == 4
    assert event["lr_after"] == event["lr_before"] * 0.5
    assert t.scheduler.base_lrs == [0.003 * 0.5]
    assert event["weight_decay"] == pytest.approx(0.05 * 2) and event["schedule"] == "by_samples"
    # 3 planned steps of 8 = 24 samples: 1 step of 8, then the failed window replayed as 4 steps of 4.
    assert result.global_step == 5 and (result.batch_size, result.grad_accum) == (4, 1)
    t.sampler.set_epoch(0)
    assert seen == t.sampler.order().tolist()[:24]
    # The schedule counts samples: after 5 steps it is where 3 steps of 8 would have put it.
    factor = t.scheduler.lr_lambdas[0]
    assert factor.position(t.scheduler.last_epoch) == 3.0
    reference = SampleProgressFactor(3, 0, reference_global_batch=8)  # the planned 3 steps of 8
    expected = [0.003 * reference(0)] + [0.003 * 0.5 * reference(pos) for pos in (1, 1.5, 2, 2.5)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_sample_based_schedule_is_the_step_schedule_until_the_global_batch_changes():
    def lrs(scheduler, optimizer, steps):
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    opt_a = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    opt_b = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = SampleProgressFactor(100, 10, reference_global_batch=8)
    ours = torch.optim.lr_scheduler.LambdaLR(opt_b, factor)
    assert lrs(ours, opt_b, 100) == lrs(warmup_cosine(opt_a, 100, 10), opt_a, 100)  # bit-identical
    halved = SampleProgressFactor(100, 10, reference_global_batch=8)
    halved.set_global_batch(40, 4)  # after 40 steps of 8, steps of 4: the remaining 60 take 120 steps
    assert halved(40 + 120) == factor(100) and halved(40 + 60) == factor(70)


def test_exhausted_recovery_leaves_emergency_checkpoint_and_a_clear_error(make_config, tmp_path, tiny_stage,
                                                                         monkeypatch):
    monkeypatch.setenv("PILLSNAP_INJECT_OOM", "3")  # both injection sources: the config and the environment
    t = _trainer(make_config, tmp_path, tiny_stage, "train.oom.max_retries=2", "train.oom.inject_at_steps=[1,2]")
    with pytest.raises(OomExhaustedError, match=r"exhausted after 3 retries.*max_retries=2.*emergency\.pt"):
        t.run()
    actions = [e["action"] for e in t.oom_events]
    assert actions == [AMP_FP16, MICROBATCHING, EMERGENCY_EXIT]
    emergency = load_checkpoint(tmp_path / "run/checkpoints/emergency.pt")
    assert emergency["global_step"] == 2 and emergency["oom_state"]["retries"] == 3
    assert json.loads(emergency["oom_events_json"])[-1]["action"] == EMERGENCY_EXIT


def test_non_finite_loss_saves_emergency_checkpoint_and_names_step_and_batch(make_config, tmp_path, tiny_stage):
    t = _trainer(make_config, tmp_path, tiny_stage)
    real, calls = t.criterion, []

    def poisoned(logits, target):
        calls.append(1)
        loss = real(logits, target)
        return loss * float("nan") if len(calls) == 2 else loss

    t.criterion = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 2 \(batch: .*'images': \[") as info:
        t.run()
    assert info.value.step == 2 and len(info.value.batch_info["images"]) == 8
    emergency = load_checkpoint(tmp_path / "run/checkpoints/emergency.pt")
    assert emergency["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in emergency["model"].values() if v.dtype.is_floating_point)
    for key, value in emergency["model"].items():  # the weights before the poisoned step
        assert torch.equal(value, t.model.state_dict()[key]), key


def test_loop_records_monitor_warnings_and_keeps_result_json_serialisable(make_config, tmp_path, tiny_stage):
    from pillsnap.train.loop import result_dict

    t = _trainer(make_config, tmp_path, tiny_stage, "train.max_steps_per_epoch=1", "train.classification.epochs=3",
                 "train.early_stopping.monitor=val_loss", "train.early_stopping.mode=min",
                 "train.early_stopping.min_delta=100")
    result = t.run()
    (plateau,) = [w for w in result.warnings if w["kind"] == "plateau"]
    assert plateau["epoch"] == 3 and "lower the learning rate" in plateau["message"]
    out = json.loads(json.dumps(result_dict(result)))
    assert {"oom_events", "auto_batch", "num_workers", "warnings", "batch_size", "grad_accum"} <= set(out)
    assert out["warnings"] == result.warnings and out["oom_events"] == [] and out["auto_batch"] is None


def test_oom_after_unscale_with_an_enabled_grad_scaler_replays_cleanly(make_config, tmp_path, tiny_stage,
                                                                       monkeypatch):
    # An OOM inside clip_grad_norm_ comes after scaler.unscale_: without a reset the replay's unscale_ raises.
    t = _trainer(make_config, tmp_path, tiny_stage, "train.oom.escalate_to_fp16=false",
                 "train.max_steps_per_epoch=2")
    t.scaler = torch.amp.GradScaler("cpu", enabled=True)  # as under fp16 autocast on CUDA
    real_clip, failures = torch.nn.utils.clip_grad_norm_, []

    def clip_once_oom(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (inside clip_grad_norm_)")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_once_oom)
    result = t.run()
    assert [e["action"] for e in result.oom_events] == [MICROBATCHING] and result.global_step == 2
    assert t.scaler.get_scale() == 65536.0
