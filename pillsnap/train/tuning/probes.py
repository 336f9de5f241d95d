"""Probes for auto batch (D-4 / Annex 1), run on a training UNIT (either model) with its real data.

A training probe runs `steps` real optimizer steps (forward, loss, backward, step, EMA) at one batch size and
returns the peak bytes, or raises OOM; an eval probe runs one forward under inference_mode. Weights, optimizer
state and EMA are restored afterwards, so probing trains nothing. On CUDA the peak is the allocator's; on a CPU it
is the process's resident memory, sampled while the steps run (host RAM is what a CPU run can run out of). Probes run the EAGER model: a compiled one
would recompile for every probed size (minutes with max-autotune); the VRAM headroom (D-4: 0.88) absorbs
compile's own memory.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Callable, List

import psutil

import torch

from pillsnap.train.tuning.autobatch import ProbeFn
from pillsnap.train.units.base import TrainUnit

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MakeBatch = Callable[[int], Any]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def repeat_batches(items: List[Any], collate: Callable[[List[Any]], Any]) -> MakeBatch:
    """Batches of any size from a few real (augmented) items, repeated. Each use gets copies: ultralytics' collate
    adds the image index to every item's batch_idx in place, which would accumulate over reused items."""
    if not items:
        raise RuntimeError("auto batch: no readable training sample to probe with")
    return lambda batch_size: collate([copy.deepcopy(items[i % len(items)]) for i in range(batch_size)])


def _measure(device: torch.device, run: Callable[[], None]) -> int:
    if device.type != "cuda":
        return _measure_host(run)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _measure_host(run: Callable[[], None], interval_s: float = 0.002) -> int:
    """Peak resident bytes of this process while `run` executes (sampled by a thread)."""
    proc = psutil.Process()
    peak, done = [proc.memory_info().rss], threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], proc.memory_info().rss)


def training_probe(unit: TrainUnit, make_batch: MakeBatch, steps: int = 2) -> ProbeFn:
    def probe(batch_size: int, amp_dtype: str) -> int:
        saved = (_to_cpu(unit.model.state_dict()), _to_cpu(unit.optimizer.state_dict()),
                 _to_cpu(unit.ema.state_dict()) if unit.ema is not None else None)
        compiled, unit.train_model.current = unit.train_model.current, unit.model

        def run() -> None:
            for _ in range(steps):
                batch = make_batch(batch_size)
                with torch.autocast(unit.policy.device.type, dtype=_AMP_DTYPES.get(amp_dtype, torch.float32),
                                    enabled=amp_dtype in _AMP_DTYPES):
                    loss = unit.loss(batch)
                loss.backward()
                unit.optimizer.step()
                unit.optimizer.zero_grad(set_to_none=True)
                if unit.ema is not None:
                    unit.ema.update(unit.model)

        try:
            return _measure(unit.policy.device, run)
        finally:
            unit.train_model.current = compiled
            unit.optimizer.zero_grad(set_to_none=True)
            unit.model.load_state_dict(saved[0])
            unit.optimizer.load_state_dict(saved[1])
            if unit.ema is not None:
                unit.ema.load_state_dict(saved[2])
    return probe


def eval_probe(unit: TrainUnit, make_batch: MakeBatch) -> ProbeFn:
    def probe(batch_size: int, amp_dtype: str) -> int:
        model = unit.eval_module
        was_training = model.training
        model.eval()

        def run() -> None:
            with torch.inference_mode(), torch.autocast(unit.policy.device.type,
                                                        dtype=_AMP_DTYPES.get(amp_dtype, torch.float32),
                                                        enabled=amp_dtype in _AMP_DTYPES):
                unit.eval_forward(model, make_batch(batch_size))

        try:
            return _measure(unit.policy.device, run)
        finally:
            model.train(was_training)
    return probe
