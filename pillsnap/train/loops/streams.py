"""A unit's training data as a stream of optimizer-step windows, positioned in SAMPLES.

The stream knows its epoch and how many sampler positions of it were consumed (unreadable samples included), so
 - a resume restarts the seeded epoch order at exactly that position (no batch replayed to get there);
 - OOM S3 rewinds the failed window and re-feeds the same positions at a new batch size;
 - an epoch is a fixed number of samples (steps_per_epoch x the planned global batch), whatever batch runs.
Positions are global: with several ranks each loader batch of a rank is its slice of a global batch of
world x batch positions (the sampler's shard), and every rank counts the same positions.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, List, Optional, Tuple

from torch.utils.data import DataLoader

from pillsnap.train.data import UnitData

_END = object()


def steps_per_epoch(n: int, batch_size: int, accum: int, drop_last: bool, cap: Optional[int]) -> int:
    """Optimizer steps in one epoch of n samples (the ONE formula every loop and tuner uses)."""
    batches = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
    steps = max(1, batches // max(1, accum))
    return min(steps, cap) if cap else steps


class Stream:
    def __init__(self, data: UnitData, batch_size: int, samples_per_epoch: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world
        self.samples_per_epoch = max(1, min(samples_per_epoch, len(data.dataset)))
        self.num_workers = data.num_workers
        self.epoch, self.pos = 0, 0
        self._loader: Optional[DataLoader] = None
        self._it: Optional[Iterator] = None
        self._it_pos = 0  # sampler position the live iterator has reached

    @property
    def epoch_done(self) -> bool:
        return self.pos >= self.samples_per_epoch

    def next_window(self, n_batches: int) -> Tuple[List[Any], int]:
        """Up to n_batches loader batches (unreadable ones dropped) and the sampler positions they consumed."""
        if self._it is None:
            self._start()
        batches, consumed, taken = [], 0, 0
        while taken < n_batches and self.pos + consumed < self.samples_per_epoch:
            remaining = len(self.data.dataset) - self._it_pos
            batch = next(self._it, _END) if remaining > 0 else _END
            if batch is _END:  # the loader ran dry before the planned positions: the epoch is over
                consumed = self.samples_per_epoch - self.pos
                break
            size = min(self.batch_size * self.world, remaining)
            self._it_pos += size
            consumed += size
            taken += 1
            if batch is not None:
                batches.append(batch)
        consumed = min(consumed, self.samples_per_epoch - self.pos)
        self.pos += consumed
        return batches, consumed

    def new_epoch(self) -> None:
        self.epoch, self.pos, self._it = self.epoch + 1, 0, None

    def rewind(self, positions: int) -> None:
        """Give back the last `positions` (an S3 window); the next window re-reads them."""
        self.pos -= positions
        self._it = None

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size != self.batch_size:
            self.batch_size = batch_size
            self.close()

    def set_workers(self, num_workers: int) -> None:
        if num_workers != self.num_workers:
            self.num_workers = num_workers
            self.close()

    def _start(self) -> None:
        if self.data.on_epoch is not None and self.data.on_epoch(self.epoch):  # idempotent: safe on resume
            self.close()
        if self._loader is None:
            self._loader = self.data.build_loader(self.batch_size, self.num_workers)
        self.data.sampler.set_epoch(self.epoch, self.pos)
        self.data.sampler.set_shard(self.rank, self.world, self.batch_size)
        self._it, self._it_pos = iter(self._loader), self.pos

    def close(self) -> None:
        """Stop persistent workers now (not at garbage collection) and forget the loader."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader, self._it = None, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size, "num_workers": self.num_workers}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.set_batch_size(int(state["batch_size"]))
        self.set_workers(int(state["num_workers"]))
        self._it = None
