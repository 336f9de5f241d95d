"""Streams: windows counted in samples, exact resume, S3 rewind at a new batch size, epoch caps; the one
"improved?" rule; the one steps-per-epoch formula."""
import math

import torch
from torch.utils.data import DataLoader, Dataset

from pillsnap.data.datasets import EpochSampler
from pillsnap.train.data import UnitData
from pillsnap.train.loops.streams import Stream, steps_per_epoch
from pillsnap.train.services.checkpoint_policy import improved


class Numbers(Dataset):
    def __init__(self, n: int, unreadable=()):
        self.n, self.unreadable = n, set(unreadable)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return None if i in self.unreadable else i


def _collate(items):
    kept = [i for i in items if i is not None]
    return torch.tensor(kept) if kept else None


def _stream(n=10, batch=4, per_epoch=None, unreadable=()):
    ds = Numbers(n, unreadable)
    sampler = EpochSampler(n, seed=3, with_seeds=False)
    data = UnitData(ds, sampler, lambda bs, workers: DataLoader(ds, batch_size=bs, sampler=sampler,
                                                                collate_fn=_collate), 0, False)
    return Stream(data, batch, per_epoch or n)


def _values(window):
    return [int(x) for b in window for x in b]


def test_an_epoch_is_a_permutation_and_the_next_one_another():
    s = _stream(n=12, batch=4)
    first = []
    while not s.epoch_done:
        window, consumed = s.next_window(1)
        first += _values(window)
    s.new_epoch()
    second = []
    while not s.epoch_done:
        second += _values(s.next_window(1)[0])
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12)) and first != second


def test_resume_mid_epoch_continues_the_same_order():
    a = _stream(n=16, batch=4)
    a.next_window(2)
    state = a.state()
    rest = _values(a.next_window(2)[0])
    b = _stream(n=16, batch=4)
    b.restore(state)
    assert _values(b.next_window(2)[0]) == rest and b.pos == 16


def test_s3_rewind_replays_the_same_samples_at_the_new_batch():
    s = _stream(n=16, batch=4)
    s.next_window(1)
    window, consumed = s.next_window(2)  # the window an OOM S3 refused
    s.rewind(consumed)
    s.set_batch_size(2)
    replayed = _values(s.next_window(2)[0]) + _values(s.next_window(2)[0])
    assert replayed == _values(window) and s.pos == 12


def test_unreadable_samples_count_as_consumed_positions():
    s = _stream(n=8, batch=4, unreadable=range(8))
    window, consumed = s.next_window(1)
    assert window == [] and consumed == 4


def test_the_epoch_ends_at_its_planned_samples():
    s = _stream(n=40, batch=4, per_epoch=8)  # train.max_steps_per_epoch caps an epoch
    s.next_window(1), s.next_window(1)
    assert s.epoch_done and s.pos == 8


def test_steps_per_epoch_formula():
    assert steps_per_epoch(10, 4, 1, drop_last=True, cap=None) == 2
    assert steps_per_epoch(10, 4, 1, drop_last=False, cap=None) == 3
    assert steps_per_epoch(100, 4, 2, drop_last=True, cap=5) == 5
    assert steps_per_epoch(3, 4, 1, drop_last=True, cap=None) == 1  # fewer samples than a batch: one step


def test_nan_and_none_never_improve_ties_do():
    nan = float("nan")
    assert improved(0.3, None) and improved(0.3, nan) and improved(0.3, 0.2) and improved(0.0, 0.0)
    assert not improved(nan, 0.2) and not improved(None, 0.2) and not improved(nan, nan)
    assert not improved(0.3, 0.29, min_delta=0.05) and improved(0.2, 0.3, mode="min")
    assert math.isnan(nan)
