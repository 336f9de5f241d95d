"""Annex 2: choose DataLoader num_workers by measuring data_time (time spent waiting for the next batch).

Each candidate gets a fresh loader from `build_loader(num_workers)`; the first `warmup_steps` batches absorb
worker start-up, the next `measure_steps` are timed. Lowest mean wins; candidates within 5 % of the best
count as a tie and the one with fewer workers is kept (less RAM, fewer processes, same speed).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

TIE_TOLERANCE = 0.05


@dataclass
class WorkerChoice:
    num_workers: int
    data_time_s: Dict[int, float]  # candidate -> mean seconds waiting for one batch
    measured_steps: Dict[int, int]
    skipped: List[int] = field(default_factory=list)  # candidates above the machine's cores
    cpu_count: int = 0
    reason: str = ""

    def tb_scalars(self) -> Dict[str, float]:
        scalars = {"perf/num_workers": float(self.num_workers)}
        scalars.update({f"perf/worker_autotune_data_time/{n}": t for n, t in self.data_time_s.items()})
        return scalars


def available_cores() -> int:
    """Cores this process may use (affinity / cgroup-pinned), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def clip_candidates(candidates: Sequence[int], cores: int) -> tuple[List[int], List[int]]:
    """(usable, skipped): candidates within [0, cores]; never empty."""
    if not candidates or min(candidates) < 0:
        raise ValueError(f"dataloader.autotune_candidates={list(candidates)}: need non-negative worker counts")
    usable = sorted({c for c in candidates if c <= cores})
    skipped = sorted({c for c in candidates if c > cores})
    if not usable:  # a small machine still gets one measurement: as many workers as it has cores
        usable = [cores]
    return usable, skipped


def measure_data_time(loader: Iterable[Any], warmup_steps: int, measure_steps: int,
                      clock: Callable[[], float] = time.perf_counter) -> tuple[float, int]:
    """(mean seconds per batch over the measured steps, number measured). Stops early if the loader ends."""
    iterator = iter(loader)
    try:
        for _ in range(warmup_steps):
            next(iterator)
        total, measured = 0.0, 0
        for _ in range(measure_steps):
            start = clock()
            next(iterator)
            total += clock() - start
            measured += 1
    except StopIteration:
        pass
    finally:
        # Shuts worker processes down now instead of at garbage collection, before the next candidate starts.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        del iterator
    if measured == 0:
        raise ValueError(f"loader yielded no batch after {warmup_steps} warm-up steps: "
                         "lower warmup_steps or use a larger dataset for autotuning")
    return total / measured, measured


def autotune_num_workers(
    build_loader: Callable[[int], Iterable[Any]],
    candidates: Sequence[int],
    warmup_steps: int = 30,
    measure_steps: int = 100,
    cpu_count: Optional[int] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> WorkerChoice:
    """Measure each usable candidate, return the fastest (ties within 5 % -> fewer workers)."""
    cores = cpu_count or available_cores()
    usable, skipped = clip_candidates(candidates, cores)
    if skipped:
        logger.info("worker autotune: skipping %s (only %d cores)", skipped, cores)
    times: Dict[int, float] = {}
    steps: Dict[int, int] = {}
    for workers in usable:
        times[workers], steps[workers] = measure_data_time(build_loader(workers), warmup_steps, measure_steps, clock)
        logger.info("worker autotune: num_workers=%d data_time=%.2f ms (%d steps)",
                    workers, 1000 * times[workers], steps[workers])
    best_time = min(times.values())
    chosen = min(w for w, t in times.items() if t <= best_time * (1 + TIE_TOLERANCE))
    fastest = min(times, key=times.__getitem__)
    reason = (f"fastest: {chosen} workers at {1000 * best_time:.2f} ms/batch" if chosen == fastest else
              f"{chosen} workers within {TIE_TOLERANCE:.0%} of the fastest ({fastest}): fewer workers kept")
    logger.info("worker autotune: chose num_workers=%d (%s)", chosen, reason)
    return WorkerChoice(chosen, times, steps, skipped, cores, reason)
