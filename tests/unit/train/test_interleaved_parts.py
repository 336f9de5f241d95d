"""The interleaved loop's building blocks: cycling streams with exact resume, NaN-safe comparisons."""
import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from pillsnap.train.detector_callbacks import nan_safe_greater
from pillsnap.train.interleaved_parts import EpochOrder, Stream


def _stream(n=10, batch=4, cap=None):
    sampler = EpochOrder(n, seed=3)
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch, sampler=sampler)
    per_epoch = math.ceil(n / batch) if cap is None else cap
    return Stream(loader, sampler, batch, per_epoch)


def test_a_small_set_cycles_and_counts_its_epochs():
    s = _stream()
    seen = [s.next()[0].tolist() for _ in range(7)]  # 3 batches per epoch: epochs 0, 1 and a third started
    assert s.epoch == 2 and s.pos == 1 and s.epochs_seen == 7 / 3
    first_epoch = sorted(x for b in seen[:3] for x in b)
    assert first_epoch == list(range(10))  # each epoch is a full permutation
    assert seen[:3] != seen[3:6]  # and a different one per epoch


def test_resume_mid_epoch_continues_the_same_order():
    a = _stream()
    for _ in range(4):
        a.next()
    state = a.state()
    rest = [a.next()[0].tolist() for _ in range(4)]
    b = _stream()
    b.restore(state)
    assert [b.next()[0].tolist() for _ in range(4)] == rest


def test_max_steps_per_epoch_caps_an_epoch():
    s = _stream(n=40, batch=4, cap=2)
    s.next(), s.next()
    assert s.epoch == 1 and s.pos == 0


def test_nan_and_none_never_win_a_comparison():
    nan = float("nan")
    assert nan_safe_greater(0.3, None) and nan_safe_greater(0.3, nan) and nan_safe_greater(0.3, 0.2)
    assert not nan_safe_greater(nan, 0.2) and not nan_safe_greater(None, 0.2) and not nan_safe_greater(nan, nan)
    assert not nan_safe_greater(0.3, 0.29, min_delta=0.05)


def test_not_measured_metrics_come_back_as_nan_not_none(tmp_path):
    from pillsnap.evaluate.reports import write_json_atomic
    from pillsnap.train.detector import _load_state

    record = {"epoch": 1, "train": {"box_loss": 1.0}, "val": {"mAP_0.5": float("nan")}, "not_measured": ["mAP_0.5"]}
    write_json_atomic(tmp_path / "state.json", {"signature": "abc", "history": [record]})
    assert _load_state(tmp_path / "state.json", "abc", "last")["history"][0]["val"]["mAP_0.5"] != 0.0
    assert math.isnan(_load_state(tmp_path / "state.json", "abc", "last")["history"][0]["val"]["mAP_0.5"])
    assert _load_state(tmp_path / "state.json", "other-config", "last") == {}
    assert _load_state(tmp_path / "state.json", "abc", "none") == {}
