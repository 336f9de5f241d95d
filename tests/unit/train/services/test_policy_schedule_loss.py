"""Precision/compile policy, LR schedule shape, loss weights, and gradient-accumulation equivalence."""
import pytest
import torch

from pillsnap.config import OptimizationConfig
from pillsnap.train.loss import build_criterion, class_weights, sample_weights
from pillsnap.train.services.policy import CompiledModel, resolve_policy, select_amp_dtype
from pillsnap.train.services.schedule import MIN_LR_FACTOR, lr_schedule
from tests.unit.train.conftest import classifier_member


def test_amp_dtype_policy():
    assert select_amp_dtype("auto", True, bf16_supported=True) is torch.bfloat16
    assert select_amp_dtype("auto", True, bf16_supported=False) is torch.float16
    assert select_amp_dtype("fp16", True, True) is torch.float16
    with pytest.raises(ValueError, match="amp_dtype"):
        select_amp_dtype("fp8", True, True)


def test_a_cpu_runs_the_configured_precision_memory_format_and_compile():
    p = resolve_policy(OptimizationConfig(amp=True, channels_last=True, torch_compile="max-autotune"), device="cpu")
    assert (p.amp_dtype, p.use_scaler, p.channels_last, p.tf32) == (torch.bfloat16, False, True, False)
    assert p.compile_mode == "max-autotune-no-cudagraphs" and p.compile_backend == "inductor"
    line = p.describe()
    assert "amp=bfloat16" in line and "compile=max-autotune-no-cudagraphs backend=inductor" in line
    assert "needs CUDA graphs" in line and "tf32 is a CUDA matmul mode" in line  # why it differs from the config
    p = resolve_policy(OptimizationConfig(amp=True, amp_dtype="fp16", torch_compile="reduce-overhead"), device="cpu")
    assert (p.amp_dtype, p.use_scaler, p.compile_mode) == (torch.float16, True, "default")
    off = resolve_policy(OptimizationConfig(amp=False, channels_last=False, torch_compile="none", tf32=False), "cpu")
    assert (off.amp_dtype, off.channels_last, off.compile_mode, off.notes) == (None, False, "none", ())
    assert CompiledModel(torch.nn.Linear(2, 2), off.compile_mode, off.compile_backend).state == "eager"


def test_compile_call_failure_trains_eagerly(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    compiled = CompiledModel(model, "reduce-overhead")
    assert compiled.current is model and compiled.state == "fell_back" and "training eagerly" in caplog.text
    assert CompiledModel(model, "none").state == "eager"


def test_a_backend_that_fails_at_the_first_forward_falls_back_once():
    def exploding_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")
    model = torch.nn.Linear(2, 2)
    compiled = CompiledModel(model, "reduce-overhead", backend=exploding_backend)
    assert compiled.state == "compiled"
    with pytest.raises(Exception) as failure:
        compiled(torch.ones(1, 2))
    assert compiled.fall_back(failure.value) and compiled.state == "fell_back" and compiled.current is model
    assert not compiled.fall_back(failure.value)  # already eager: a second failure is a real error
    assert torch.equal(compiled(torch.ones(1, 2)), model(torch.ones(1, 2)))


def test_only_the_compilers_own_failure_drops_compile():
    """The model's own error (eager raises it too) and an OOM while compiling or capturing (the D-8 machine's) keep
    compile; each is raised to the caller instead of replayed on the eager model."""
    from pillsnap.train.services.oom_state_machine import is_oom_error

    model = torch.nn.Linear(2, 2)
    compiled = CompiledModel(model, "default", backend="aot_eager")
    with pytest.raises(Exception) as own:
        compiled(torch.ones(1, 3))  # the wrong width: the model's error, found while dynamo traces it
    assert not compiled.fall_back(own.value) and compiled.state == "compiled"

    def out_of_memory(gm, example_inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (during graph capture)")
    starved = CompiledModel(model, "reduce-overhead", backend=out_of_memory)
    with pytest.raises(Exception) as oom:
        starved(torch.ones(1, 2))
    assert is_oom_error(oom.value) and not starved.fall_back(oom.value) and starved.state == "compiled"


def test_warmup_then_cosine_without_restarts():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, total_steps=100, warmup_steps=10, kind="cosine", reference_global_batch=8)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10] and lrs[10] == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decays monotonically: no restart"
    assert lrs[-1] == pytest.approx(MIN_LR_FACTOR, abs=0.01)


def test_class_weights_and_exclusive_options():
    labels = [0] * 90 + [1] * 10
    inv = class_weights(labels, 3, "inverse_frequency")
    assert inv[1] / inv[0] == pytest.approx(9.0) and inv[2] == 0 and inv[:2].mean() == pytest.approx(1.0)
    eff = class_weights(labels, 3, "effective_number")
    assert 1.0 < eff[1] / eff[0] < 9.0
    sw = sample_weights(labels, 3)
    assert sw[:90].sum() == pytest.approx(sw[90:].sum())
    from pillsnap.config import LossConfig
    with pytest.raises(ValueError, match="choose one"):
        build_criterion(LossConfig(use_class_weights=True, weighted_sampler=True), labels, 3)
    crit = build_criterion(LossConfig(use_class_weights=True, label_smoothing=0.2), labels, 3)
    assert crit.hard.label_smoothing == 0.2 and torch.allclose(crit.hard.weight, inv)
    from pillsnap.config import AugmentConfig
    with pytest.raises(ValueError, match="soft targets"):
        build_criterion(LossConfig(use_class_weights=True), labels, 3, AugmentConfig(mixup=0.2))
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    assert crit(torch.zeros(1, 3), soft) == pytest.approx(torch.log(torch.tensor(3.0)))


def test_accumulation_two_by_four_matches_one_by_eight(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    eight = {}

    def grads(accum: int, bs: int):
        cfg = make_config(tmp_path, "train.deterministic=true", f"train.grad_accum_steps={accum}",
                          f"train.classification.batch_size={bs}", "train.grad_clip=0", "loss.label_smoothing=0")
        member = classifier_member(cfg, m, cmap, tmp_path / f"g{accum}")
        unit = member.unit
        unit.model.eval()  # BatchNorm on running stats, so micro-batches see the same normalisation
        eight.setdefault("batch", next(iter(unit.val_loader)) if bs == 8 else None)
        for part in unit.split(eight["batch"], bs):
            unit.forward_backward(part, bs / 8)
        return {n: p.grad.clone() for n, p in unit.model.named_parameters() if p.grad is not None}

    b, a = grads(1, 8), grads(2, 4)
    assert len(eight["batch"]["indices"]) == 8
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
