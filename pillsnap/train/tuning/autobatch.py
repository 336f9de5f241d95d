"""D-4 / Annex 1: find the largest batch that really trains within the memory headroom.

A probe runs REAL training steps (forward, loss, backward, optimizer step, EMA) at one batch size and returns
the peak bytes, or raises OOM. The search:
  1. probe the configured batch; while it fails, halve it. The first OOM also switches autocast to fp16
     (when allowed), and accumulation grows so the global batch is kept (up to max_grad_accum);
  2. once a size fits, double it until one fails or max_bs is reached;
  3. bisect between the last size that fit and the first that failed.
"Fits" means: no OOM and peak <= headroom x device memory. The answer is always a size that was probed and
fit, under the dtype it is returned with, and smaller than every size that failed: peaks are never
extrapolated to sizes that were not probed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch

from pillsnap.train.services.oom_state_machine import is_fatal_cuda_error, is_oom_error, release_cached_memory

logger = logging.getLogger(__name__)

ProbeFn = Callable[[int, str], int]  # (batch_size, amp_dtype "bf16"|"fp16"|"fp32") -> peak bytes; raises OOM
ProbeRecord = Tuple[int, Union[int, str]]  # (batch_size, peak_bytes | "oom")

_FIT, _OOM, _OVER = "fit", "oom", "over_headroom"
CPU_REASON = "cpu: keeping configured batch"  # only where nothing was probed: never a tuning success
HOST_REASON = ("cpu: host memory probed with real steps; the configured batch is the ceiling "
               "(a larger batch does not make a CPU faster)")


class AutoBatchError(RuntimeError):
    """Not even the smallest batch fits; the message lists what was tried."""


@dataclass
class AutoBatchResult:
    batch_size: int
    grad_accum: int
    amp_dtype: str
    memory_fraction: Optional[float]  # peak of the chosen size / device memory; None when nothing was probed
    probes: List[ProbeRecord] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)
    target_global_batch: Optional[int] = None  # configured batch x configured accumulation

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def lr_scale(self) -> float:
        """Linear scaling rule for the LR when the global batch differs from the configured one."""
        return self.global_batch / self.target_global_batch if self.target_global_batch else 1.0

    def tb_scalars(self) -> dict[str, float]:
        scalars = {"perf/auto_batch_found": float(self.batch_size), "perf/auto_batch_grad_accum": float(self.grad_accum)}
        if self.memory_fraction is not None:
            scalars["perf/auto_batch_memory_fraction"] = self.memory_fraction
        return scalars


class _ProbeBudgetSpent(Exception):
    pass


class _Search:
    """Runs probes, records them, classifies each as fit / oom / over headroom."""

    def __init__(self, probe: ProbeFn, limit_bytes: float, release_memory: Callable[[], None], max_probes: int):
        self.probe, self.limit_bytes = probe, limit_bytes
        self.release_memory, self.max_probes = release_memory, max_probes
        self.records: List[ProbeRecord] = []
        self.peaks: dict[int, int] = {}
        self.fit_dtype: Optional[str] = None  # only phase 1 switches dtype, before anything fits

    def run(self, batch_size: int, amp_dtype: str) -> str:
        if len(self.records) >= self.max_probes:
            raise _ProbeBudgetSpent
        oom_message: Optional[str] = None
        try:
            peak = int(self.probe(batch_size, amp_dtype))
        except Exception as exc:  # noqa: BLE001 - only OOM is a search outcome
            if is_fatal_cuda_error(exc) or not is_oom_error(exc):
                raise
            oom_message = str(exc).splitlines()[0][:200]
        if oom_message is not None:
            self.release_memory()  # outside the except block, so the failed step's tensors can go
            self.records.append((batch_size, "oom"))
            logger.info("auto batch: bs=%d (%s) -> OOM (%s)", batch_size, amp_dtype, oom_message)
            return _OOM
        self.records.append((batch_size, peak))
        self.peaks[batch_size] = peak
        outcome = _FIT if peak <= self.limit_bytes else _OVER
        if outcome == _FIT:
            self.fit_dtype = amp_dtype
        logger.info("auto batch: bs=%d (%s) -> peak %.2f GiB (%s, limit %.2f GiB)", batch_size, amp_dtype,
                    peak / 2**30, outcome, self.limit_bytes / 2**30)
        return outcome


def _cuda_ready(cuda_available: Optional[bool]) -> bool:
    return torch.cuda.is_available() if cuda_available is None else cuda_available


def auto_find_batch_size(
    probe: ProbeFn,
    init_bs: int,
    max_bs: int,
    headroom: float,
    device_total_bytes: Optional[int] = None,
    *,
    min_bs: int = 1,
    grad_accum: int = 1,
    max_grad_accum: int = 8,
    amp_dtype: str = "bf16",
    allow_fp16: bool = True,
    cuda_available: Optional[bool] = None,
    release_memory: Callable[[], None] = release_cached_memory,
    max_probes: int = 24,
) -> AutoBatchResult:
    """Largest training batch within `headroom` x device memory, probed, never above `max_bs`.

    `grad_accum` is the configured accumulation: the configured global batch init_bs x grad_accum is kept by
    raising accumulation (up to max_grad_accum) when the batch has to shrink. Without CUDA, the configured
    batch is returned unprobed. Raises AutoBatchError when even `min_bs` does not fit.
    """
    target_global = init_bs * grad_accum
    if not _cuda_ready(cuda_available):
        logger.info("auto batch: %s (%d x accum %d)", CPU_REASON, init_bs, grad_accum)
        return AutoBatchResult(init_bs, grad_accum, amp_dtype, None, [], [CPU_REASON], target_global)
    total = device_total_bytes or torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    search = _Search(probe, headroom * total, release_memory, max_probes)
    reasons: List[str] = []
    try:
        good, dtype = _descend_until_fit(search, init_bs, max_bs, min_bs, amp_dtype, allow_fp16, reasons)
        good = _climb_and_bisect(search, good, dtype, max_bs, reasons)
    except _ProbeBudgetSpent:
        good, dtype = _best_so_far(search, reasons)
    accum = _accumulation_for(good, target_global, max_grad_accum, reasons)
    result = AutoBatchResult(good, accum, dtype, search.peaks[good] / total, search.records, reasons, target_global)
    logger.info("auto batch: chose bs=%d accum=%d amp=%s (%.0f%% of device memory) after %d probes; %s",
                good, accum, dtype, 100 * result.memory_fraction, len(search.records), "; ".join(reasons))
    return result


def find_eval_batch_size(
    probe: ProbeFn,
    init_bs: int,
    max_bs: int,
    headroom: float,
    device_total_bytes: Optional[int] = None,
    *,
    min_bs: int = 1,
    amp_dtype: str = "fp32",
    cuda_available: Optional[bool] = None,
    release_memory: Callable[[], None] = release_cached_memory,
    max_probes: int = 24,
) -> AutoBatchResult:
    """Largest evaluation batch (no gradients, so usually larger than the training one); same rules.

    Evaluation runs in one dtype (D-6: fp32) and has no accumulation, so there is no fp16 escalation.
    """
    return auto_find_batch_size(
        probe, init_bs, max_bs, headroom, device_total_bytes, min_bs=min_bs, grad_accum=1, max_grad_accum=1,
        amp_dtype=amp_dtype, allow_fp16=False, cuda_available=cuda_available, release_memory=release_memory,
        max_probes=max_probes,
    )


def _descend_until_fit(search: _Search, init_bs: int, max_bs: int, min_bs: int, amp_dtype: str,
                       allow_fp16: bool, reasons: List[str]) -> Tuple[int, str]:
    bs = min(max(init_bs, min_bs), max_bs)
    if bs != init_bs:
        reasons.append(f"configured batch {init_bs} clamped to [{min_bs}, {max_bs}] -> {bs}")
    dtype = amp_dtype
    while True:
        outcome = search.run(bs, dtype)
        if outcome == _FIT:
            return bs, dtype
        if outcome == _OOM and allow_fp16 and dtype != "fp16":
            dtype = "fp16"
            reasons.append(f"OOM at bs={bs} with {amp_dtype}: autocast escalated to fp16")
        if bs <= min_bs:
            raise AutoBatchError(f"auto batch: even min batch {min_bs} does not fit ({outcome}); "
                                 f"probes (batch, peak bytes | oom): {search.records}; limit "
                                 f"{search.limit_bytes / 2**30:.2f} GiB")
        reasons.append(f"bs={bs} {outcome}: halving")
        bs = max(min_bs, bs // 2)


def _smallest_failure(search: _Search) -> Optional[int]:
    failed = [bs for bs, peak in search.records if peak == "oom" or peak > search.limit_bytes]
    return min(failed) if failed else None


def _climb_and_bisect(search: _Search, good: int, dtype: str, max_bs: int, reasons: List[str]) -> int:
    bad = _smallest_failure(search)
    while bad is None and good < max_bs:
        candidate = min(2 * good, max_bs)
        if search.run(candidate, dtype) == _FIT:
            good = candidate
        else:
            bad = candidate
    if bad is None:
        reasons.append(f"reached auto_batch_max={max_bs}")
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if search.run(middle, dtype) == _FIT:
            good = middle
        else:
            bad = middle
    reasons.append(f"largest fitting batch {good}; {bad} does not fit")
    return good


def _best_so_far(search: _Search, reasons: List[str]) -> Tuple[int, str]:
    bad = _smallest_failure(search)
    fitting = [bs for bs, peak in search.records
               if peak != "oom" and peak <= search.limit_bytes and (bad is None or bs < bad)]
    if not fitting:
        raise AutoBatchError(f"auto batch: no batch fit within {search.max_probes} probes: {search.records}")
    reasons.append(f"probe budget {search.max_probes} spent: keeping the largest size that fit")
    return max(fitting), str(search.fit_dtype)


def _accumulation_for(batch_size: int, target_global: int, max_grad_accum: int, reasons: List[str]) -> int:
    accum = max(1, min(max_grad_accum, math.ceil(target_global / batch_size)))
    if batch_size * accum != target_global:
        reasons.append(f"global batch {target_global} -> {batch_size * accum}: scale LR by "
                       f"{batch_size * accum / target_global:.4f} (linear scaling rule)")
    elif accum > 1:
        reasons.append(f"grad_accum={accum} keeps the global batch {target_global}")
    return accum
