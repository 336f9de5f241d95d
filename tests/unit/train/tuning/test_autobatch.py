"""Auto batch search against a simulated GPU: peak memory linear in batch, OOM above the device size."""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from pillsnap.train.tuning.autobatch import (
    CPU_REASON, AutoBatchError, auto_find_batch_size, find_eval_batch_size,
)

GIB = 2**30


class SimulatedGpu:
    """peak = base + per_sample x batch (fp16 halves activations); OOM when that exceeds the device."""

    def __init__(self, total=16 * GIB, base=2 * GIB, per_sample=0.1 * GIB, fp16_factor=0.5):
        self.total, self.base, self.per_sample, self.fp16_factor = total, base, per_sample, fp16_factor
        self.calls: List[Tuple[int, str]] = []

    def peak(self, batch_size: int, amp_dtype: str) -> int:
        factor = self.fp16_factor if amp_dtype == "fp16" else 1.0
        return int(self.base + self.per_sample * factor * batch_size)

    def __call__(self, batch_size: int, amp_dtype: str) -> int:
        self.calls.append((batch_size, amp_dtype))
        peak = self.peak(batch_size, amp_dtype)
        if peak > self.total:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {peak} bytes")
        return peak


def search(gpu: SimulatedGpu, init_bs=32, max_bs=1024, headroom=0.88, **kw):
    released: List[int] = []
    result = auto_find_batch_size(gpu, init_bs, max_bs, headroom, gpu.total, cuda_available=True,
                                  release_memory=lambda: released.append(1), **kw)
    return result, released


def largest_fitting(gpu: SimulatedGpu, headroom: float, dtype: str, max_bs: int) -> int:
    return max(b for b in range(1, max_bs + 1) if gpu.peak(b, dtype) <= headroom * gpu.total)


def assert_returns_a_probed_size_below_every_failure(result, limit_bytes: float) -> None:
    failed = [bs for bs, peak in result.probes if peak == "oom" or peak > limit_bytes]
    assert all(result.batch_size < bs for bs in failed)
    assert result.batch_size in [bs for bs, peak in result.probes if peak != "oom" and peak <= limit_bytes]


def test_finds_largest_batch_under_headroom_in_few_probes():
    gpu = SimulatedGpu()
    result, _ = search(gpu, init_bs=32, max_bs=1024)
    expected = largest_fitting(gpu, 0.88, "bf16", 1024)  # (0.88*16 - 2) / 0.1 = 120
    assert result.batch_size == expected == 120
    assert len(result.probes) <= 12 and result.grad_accum == 1 and result.amp_dtype == "bf16"
    assert result.memory_fraction == pytest.approx(gpu.peak(120, "bf16") / gpu.total)
    assert_returns_a_probed_size_below_every_failure(result, 0.88 * gpu.total)
    assert result.tb_scalars()["perf/auto_batch_found"] == 120.0


def test_respects_max_bs():
    gpu = SimulatedGpu()
    result, _ = search(gpu, init_bs=16, max_bs=64)
    assert result.batch_size == 64 and max(bs for bs, _ in result.probes) == 64
    assert any("auto_batch_max" in r for r in result.reasons)


def test_configured_batch_above_max_is_clamped():
    result, _ = search(SimulatedGpu(), init_bs=256, max_bs=64)
    assert result.batch_size == 64 and result.probes[0][0] == 64


def test_oom_during_search_escalates_fp16_and_keeps_global_batch_with_accumulation():
    gpu = SimulatedGpu(total=8 * GIB, base=2 * GIB, per_sample=0.2 * GIB)  # bf16 fits <= 25, fp16 <= 50
    result, released = search(gpu, init_bs=128, max_bs=128)
    assert result.amp_dtype == "fp16"
    assert result.probes[0] == (128, "oom") and released  # cache released after each OOM
    assert result.batch_size == largest_fitting(gpu, 0.88, "fp16", 127)
    assert result.grad_accum == min(8, -(-128 // result.batch_size))
    assert_returns_a_probed_size_below_every_failure(result, 0.88 * gpu.total)
    assert any("fp16" in r for r in result.reasons)


def test_no_fp16_escalation_when_not_allowed():
    gpu = SimulatedGpu(total=8 * GIB, base=2 * GIB, per_sample=0.2 * GIB)
    result, _ = search(gpu, init_bs=128, max_bs=128, allow_fp16=False)
    assert result.amp_dtype == "bf16" and result.batch_size == largest_fitting(gpu, 0.88, "bf16", 127)
    assert all(dtype == "bf16" for _, dtype in gpu.calls)


def test_global_batch_shrinks_only_past_max_accumulation_and_reports_lr_scale():
    gpu = SimulatedGpu(total=4 * GIB, base=2 * GIB, per_sample=0.2 * GIB)  # fits <= 7 in fp16
    result, _ = search(gpu, init_bs=128, max_bs=128, max_grad_accum=8)
    assert result.grad_accum == 8 and result.global_batch < 128
    assert result.lr_scale == pytest.approx(result.global_batch / 128)
    assert any("linear scaling" in r for r in result.reasons)


def test_never_returns_a_size_larger_than_a_failed_one_even_if_noisy():
    class Flaky(SimulatedGpu):
        def __call__(self, batch_size, amp_dtype):  # a fragmented allocator fails 96 but would pass 97
            if batch_size == 96:
                self.calls.append((batch_size, amp_dtype))
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().__call__(batch_size, amp_dtype)

    result, _ = search(Flaky(), init_bs=64, max_bs=1024)
    assert result.batch_size < 96


def test_even_min_batch_failing_raises_clear_error():
    gpu = SimulatedGpu(total=1 * GIB, base=2 * GIB)
    with pytest.raises(AutoBatchError, match="min batch 1"):
        search(gpu, init_bs=8, max_bs=8)


def test_non_oom_errors_propagate():
    def broken(batch_size, amp_dtype):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        auto_find_batch_size(broken, 8, 8, 0.88, GIB, cuda_available=True, release_memory=lambda: None)


def test_probe_budget_keeps_best_so_far():
    result, _ = search(SimulatedGpu(), init_bs=1, max_bs=1024, max_probes=4)
    assert result.batch_size == 8 and len(result.probes) == 4
    assert any("budget" in r for r in result.reasons)


def test_cpu_keeps_configured_batch_without_probing():
    gpu = SimulatedGpu()
    result = auto_find_batch_size(gpu, 48, 64, 0.88, None, grad_accum=2, cuda_available=False)
    assert (result.batch_size, result.grad_accum, result.probes) == (48, 2, [])
    assert result.reasons == [CPU_REASON] and gpu.calls == [] and result.memory_fraction is None


def test_eval_batch_search_is_bounded_the_same_way():
    gpu = SimulatedGpu(per_sample=0.02 * GIB)  # no grads: far less per sample
    result = find_eval_batch_size(gpu, 64, 512, 0.88, gpu.total, cuda_available=True, release_memory=lambda: None)
    assert result.batch_size == 512 and result.grad_accum == 1 and result.amp_dtype == "fp32"
    small = SimulatedGpu(total=4 * GIB, per_sample=0.02 * GIB)
    result = find_eval_batch_size(small, 64, 512, 0.88, small.total, cuda_available=True,
                                  release_memory=lambda: None)
    assert result.batch_size == largest_fitting(small, 0.88, "fp32", 512)
    assert all(dtype == "fp32" for _, dtype in small.calls)
