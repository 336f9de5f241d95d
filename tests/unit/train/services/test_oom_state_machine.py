"""D-8 OOM state machine, error classification and fault injection; the guard's error filter."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pillsnap.train.services.oom_state_machine import (
    AMP_FP16, EMERGENCY_EXIT, GLOBAL_BATCH_CHANGE, MICROBATCHING, FaultInjector, OomPolicy, OomRecovery, OomState,
    is_fatal_cuda_error, is_oom_error,
)
from pillsnap.train.services.guarded_step import OomExhaustedError, StepGuard
from pillsnap.train.services.schedule import scale_optimizer_hparams


def policy(**kw) -> OomPolicy:
    values = dict(max_retries=4, max_grad_accum=8, min_batch=1, cooldown_sec=2.0, escalate_to_fp16=True)
    values.update(kw)
    return OomPolicy(**values)


def machine(bs=64, accum=1, dtype="bf16", sleeps=None, **kw) -> OomRecovery:
    sleep = (lambda s: sleeps.append(s)) if sleeps is not None else (lambda s: None)
    return OomRecovery(policy(**kw), OomState(bs, accum, dtype), sleep=sleep)


def test_s1_escalates_to_fp16_once_then_s2_keeps_global_batch():
    sleeps: list[float] = []
    rec = machine(64, 1, "bf16", sleeps)
    first = rec.decide("CUDA out of memory")
    assert first.action == AMP_FP16 and first.state.amp_dtype == "fp16" and first.state.did_amp_escalate
    assert (first.state.batch_size, first.state.grad_accum) == (64, 1) and first.lr_scale == 1.0
    second = rec.decide("CUDA out of memory")
    assert second.action == MICROBATCHING
    assert (second.state.batch_size, second.state.grad_accum) == (32, 2)
    assert second.state.global_batch == 64 and second.lr_scale == 1.0
    assert sleeps == [2.0, 2.0]  # cooldown before each recovery step


def test_s1_skipped_when_disabled_or_already_fp16():
    assert machine(escalate_to_fp16=False).decide().action == MICROBATCHING
    assert machine(dtype="fp16").decide().action == MICROBATCHING


def test_s2_doubles_accumulation_until_its_cap_then_s3():
    rec = machine(64, 1, "fp16", max_retries=10, max_grad_accum=8)
    seen = [(d.action, d.state.batch_size, d.state.grad_accum) for d in (rec.decide() for _ in range(4))]
    assert seen == [(MICROBATCHING, 32, 2), (MICROBATCHING, 16, 4), (MICROBATCHING, 8, 8),
                    (GLOBAL_BATCH_CHANGE, 4, 8)]


def test_s3_scales_lr_by_g_ratio():
    rec = machine(8, 8, "fp16", max_grad_accum=8)
    d = rec.decide()
    assert d.action == GLOBAL_BATCH_CHANGE
    g_old, g_new = 64, 4 * 8
    assert d.lr_scale == g_new / g_old == 0.5
    assert d.audit["G_old"] == g_old and d.audit["G_new"] == g_new and d.audit["lr_scale"] == 0.5


def _epoch_of_decay(lr: float, weight_decay: float, steps: int) -> float:
    """One epoch of AdamW steps with zero gradients: only the decoupled weight decay moves the weight."""
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        param.grad = torch.zeros(1, dtype=torch.float64)
        opt.step()
    return 1.0 - float(param.detach())


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_s3_keeps_the_per_epoch_weight_decay_of_adamw():
    """The property the spec states ("keep the per-epoch WD total"), measured on AdamW itself, not the formula."""
    samples, lr, wd = 4096, 1e-3, 0.05
    d = machine(8, 8, "fp16", max_grad_accum=8).decide()  # G 64 -> 32
    g_old, g_new = d.audit["G_old"], d.audit["G_new"]
    before = _epoch_of_decay(lr, wd, samples // g_old)
    param = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=wd)
    scale_optimizer_hparams(opt, None, lr_scale=d.lr_scale)  # what the unit applies for the decision
    group = opt.param_groups[0]
    after = _epoch_of_decay(group["lr"], group["weight_decay"], samples // g_new)
    assert after == pytest.approx(before, rel=1e-3)
    # The spec's wd *= G_old/G_new would double it: the defect this guards against.
    doubled = _epoch_of_decay(group["lr"], wd * g_old / g_new, samples // g_new)
    assert doubled == pytest.approx(2 * before, rel=1e-2)


def test_s3_when_odd_batch_cannot_keep_global_batch():
    d = machine(5, 1, "fp16").decide()  # 5 -> 2 x ceil(5/2)=3 = 6 != 5
    assert d.action == GLOBAL_BATCH_CHANGE and d.state.global_batch == 6
    assert d.lr_scale == pytest.approx(6 / 5)


def test_exhausted_retries_is_emergency_exit_without_cooldown():
    sleeps: list[float] = []
    rec = machine(64, 1, "bf16", sleeps, max_retries=2)
    rec.decide(), rec.decide()
    d = rec.decide("CUDA out of memory")
    assert d.action == EMERGENCY_EXIT and d.is_exit
    assert d.state.retries == 3 and len(sleeps) == 2 and "max_retries" in d.audit["reason"]


def test_min_batch_with_full_accumulation_is_emergency_exit():
    d = machine(1, 8, "fp16", min_batch=1, max_grad_accum=8).decide()
    assert d.action == EMERGENCY_EXIT and "min_batch" in d.audit["reason"]


def test_every_transition_is_logged(caplog):
    rec = machine(4, 1, "bf16", max_retries=3, max_grad_accum=2)
    with caplog.at_level(logging.WARNING, logger="pillsnap.train.oom"):
        actions = [rec.decide().action for _ in range(4)]
    assert actions == [AMP_FP16, MICROBATCHING, GLOBAL_BATCH_CHANGE, EMERGENCY_EXIT]
    text = caplog.text
    assert "S1" in text and "S2" in text and "S3" in text and "emergency exit" in text


def test_policy_from_config_rejects_nonsense():
    cfg = SimpleNamespace(max_retries=4, max_grad_accum=8, min_batch=0, cooldown_sec=2, escalate_to_fp16=True)
    with pytest.raises(ValueError, match="min_batch"):
        OomPolicy.from_config(cfg)


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.9 GiB total capacity)"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR (failed to allocate workspace memory)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
])
def test_is_oom_error_positives(exc):
    assert is_oom_error(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),  # no allocation words: a real cuDNN bug
    RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    ValueError("out of memory"),  # not a RuntimeError from an allocator
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    KeyError("x"),
])
def test_is_oom_error_negatives(exc):
    assert not is_oom_error(exc)


def test_wrapped_oom_is_recognised_through_the_cause_chain():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except RuntimeError as inner:
            raise ValueError("trainer failed") from inner
    except ValueError as outer:
        assert is_oom_error(outer)


def test_cpu_allocator_failure_is_oom():
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_oom_error(info.value)


class FakeUnit:
    """The guard's view of a unit (its own OOM recovery owns the knobs), with a loss that raises what the test
    wants."""
    name, config_key = "classifier", "train.classification"

    def __init__(self, error=None, batch_size=64, **guard_rails):
        self.oom = OomRecovery(policy(cooldown_sec=0, **guard_rails), OomState(batch_size, 1, "bf16"))
        self.error, self.calls = error, 0
        self.replay = SimpleNamespace(capture=lambda: None, restore=lambda: None)
        self.train_model = SimpleNamespace(fall_back=lambda exc: False)
        self.optimizer = SimpleNamespace(zero_grad=lambda set_to_none=True: None)
        self.updated = 0

    batch_size = property(lambda self: self.oom.state.batch_size)
    accum = property(lambda self: self.oom.state.grad_accum)
    global_batch = property(lambda self: self.oom.state.global_batch)

    def batch_len(self, batch):
        return 64

    def split(self, batch, size):
        return [batch] * (64 // size)

    def forward_backward(self, batch, weight):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return torch.tensor(1.0)

    def apply_update(self):
        pass

    def after_update(self):
        self.updated += 1

    def reset_scaler_stage(self):
        pass

    def escalate_precision(self):
        return "fp16"


def _guard(unit):
    tb = SimpleNamespace(flush=lambda: None)
    telemetry = SimpleNamespace(scalars=lambda values, step: None, tb=tb)
    return StepGuard(unit, FaultInjector(), telemetry, release_memory=lambda: None)


def _emergency():
    return Path("emergency.pt")


def test_illegal_memory_access_is_fatal_and_never_retried():
    exc = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert is_fatal_cuda_error(exc) and not is_fatal_cuda_error(RuntimeError("CUDA out of memory"))
    unit = FakeUnit(exc)
    guard = _guard(unit)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        guard.step([object()], 1, 1, _emergency)
    assert unit.calls == 1 and unit.oom.state.retries == 0 and guard.events == []


def test_other_errors_pass_through_the_guard():
    guard = _guard(FakeUnit(KeyError("missing")))
    with pytest.raises(KeyError):
        guard.step([object()], 1, 1, _emergency)


def test_the_guard_records_each_decision_and_exits_with_a_named_key():
    unit = FakeUnit(torch.OutOfMemoryError("CUDA out of memory"), batch_size=2, max_retries=5, max_grad_accum=2)
    guard = _guard(unit)
    with pytest.raises(OomExhaustedError, match="train.classification.batch_size") as info:
        guard.step([object()], 3, 1, _emergency)
    assert [e["action"] for e in guard.events] == [AMP_FP16, MICROBATCHING, EMERGENCY_EXIT]
    assert info.value.decision.is_exit and guard.events[-1]["checkpoint"] == "emergency.pt"


def test_fault_injector_raises_once_at_listed_steps():
    inj = FaultInjector({3, 7})
    raised = []
    for step in [0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 8]:
        try:
            inj.maybe_raise(step)
        except torch.OutOfMemoryError as exc:
            assert is_oom_error(exc) and "injected" in str(exc)
            raised.append(step)
    assert raised == [3, 7] and inj.pending == [] and inj.fired == [3, 7]


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer.step(): it would import dynamo (slow)
def test_scale_optimizer_hparams_scales_groups_and_scheduler_base():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scale_optimizer_hparams(opt, sched, lr_scale=0.5)
    sched.step()  # the scheduler recomputes lr from base_lrs: the scale must survive
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.05)


def test_recovery_releases_the_cuda_graph_pools_before_the_cache(monkeypatch):
    """empty_cache cannot return what recorded CUDA graphs hold: the graph trees are reset first (so the next step
    records them again at the new batch size), then the cache is emptied."""
    import torch._inductor.cudagraph_trees as trees

    from pillsnap.train.services.oom_state_machine import release_cached_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: calls.append("graphs"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cache"))
    release_cached_memory()
    assert calls == ["graphs", "cache"]


def test_an_oom_while_compiling_is_recovered_by_d8_with_compile_kept():
    """An OOM raised while the compiler runs (CUDA-graph capture, autotuning) reaches the guard wrapped in the
    compiler's error: it is the D-8 machine's OOM (a recovery step, then the step again, compiled), never a reason
    to train eagerly."""
    from pillsnap.train.services.policy import CompiledModel

    captures = []

    def capture_runs_out_once(gm, example_inputs):
        captures.append(len(captures))
        if len(captures) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (while capturing a graph)")
        return gm.forward

    unit = FakeUnit()
    unit.model = torch.nn.Linear(2, 2)
    unit.train_model = CompiledModel(unit.model, "reduce-overhead", backend=capture_runs_out_once)
    unit.forward_backward = lambda batch, weight: unit.train_model(torch.ones(1, 2)).sum()
    unit.prepare_update = lambda: None
    guard = _guard(unit)
    guard.step([object()], 1, 1, _emergency)
    assert [e["action"] for e in guard.events] == [AMP_FP16] and unit.updated == 1
    assert unit.train_model.state == "compiled" and unit.train_model.current is not unit.train_model.eager
    assert captures == [0, 1]
