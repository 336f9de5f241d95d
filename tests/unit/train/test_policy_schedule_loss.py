"""Precision/compile policy, LR schedule shape, loss weights, and gradient-accumulation equivalence."""
import pytest
import torch

from pillsnap.config import OptimizationConfig
from pillsnap.train.loss import build_criterion, class_weights, sample_weights
from pillsnap.train.policy import resolve_policy, select_amp_dtype, try_compile
from pillsnap.train.schedule import warmup_cosine
from pillsnap.train.loop import ClassifierTrainer


def test_amp_dtype_policy():
    assert select_amp_dtype("auto", True, bf16_supported=True) is torch.bfloat16
    assert select_amp_dtype("auto", True, bf16_supported=False) is torch.float16
    assert select_amp_dtype("fp16", True, True) is torch.float16
    with pytest.raises(ValueError, match="amp_dtype"):
        select_amp_dtype("fp8", True, True)


def test_cpu_policy_switches_everything_off():
    p = resolve_policy(OptimizationConfig(amp=True, channels_last=True, torch_compile="max-autotune"), device="cpu")
    assert (p.amp_dtype, p.use_scaler, p.channels_last, p.compile_mode) == (None, False, False, "none")
    assert "amp=off" in p.describe() and "compile=none" in p.describe()


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    assert try_compile(model, "reduce-overhead") is model
    assert "falling back to eager" in caplog.text
    assert try_compile(model, "none") is model


def test_warmup_then_cosine_without_restarts():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10] and lrs[10] == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])), "cosine decays monotonically: no restart"
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


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
    assert crit.label_smoothing == 0.2 and torch.allclose(crit.weight, inv)


def test_accumulation_two_by_four_matches_one_by_eight(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    labels = cmap.restrict(m.loc[m.kind == "single", "k_code"])

    def grads(accum: int, bs: int):
        cfg = make_config(tmp_path, "train.deterministic=true", f"train.grad_accum_steps={accum}",
                          f"train.classification.batch_size={bs}", "train.grad_clip=0", "loss.label_smoothing=0")
        t = ClassifierTrainer(cfg, m, labels, tmp_path / f"g{accum}", show_progress=False)
        t.model.eval()  # BatchNorm on running stats, so micro-batches see the same normalisation
        x = torch.stack([t.val_ds[i][0] for i in range(8)])
        y = torch.tensor([t.val_ds[i][1] for i in range(8)])
        for part in range(accum):
            sl = slice(part * bs, (part + 1) * bs)
            t._forward_backward((x[sl], y[sl], None))
        return {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    a, b = grads(2, 4), grads(1, 8)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-4), name
