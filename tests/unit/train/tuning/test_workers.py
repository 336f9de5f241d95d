"""Worker autotune against fake loaders whose per-batch wait depends on num_workers."""
from __future__ import annotations

import logging
import time
from typing import Dict, Iterator

import pytest

from pillsnap.train.tuning.workers import autotune_num_workers, clip_candidates


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def clocked_loader_factory(clock: FakeClock, delay_s: Dict[int, float], batches: int = 100):
    """Each next() advances the fake clock by the delay of that worker count: exact, instant timings."""
    built = []

    def build(num_workers: int) -> Iterator[int]:
        built.append(num_workers)

        def batches_gen():
            for i in range(batches):
                clock.now += delay_s[num_workers]
                yield i
        return batches_gen()
    return build, built


def test_picks_fastest_candidate_with_real_sleeps(caplog):
    delay = {0: 0.008, 1: 0.004, 2: 0.001}

    def build(num_workers):
        def gen():
            while True:
                time.sleep(delay[num_workers])
                yield num_workers
        return gen()

    with caplog.at_level(logging.INFO, logger="pillsnap.train.tuning.workers"):
        choice = autotune_num_workers(build, [0, 1, 2], warmup_steps=1, measure_steps=5, cpu_count=2)
    assert choice.num_workers == 2
    assert choice.data_time_s[0] > choice.data_time_s[2]
    assert caplog.text.count("worker autotune: num_workers=") == 3
    assert choice.tb_scalars()["perf/num_workers"] == 2.0


def test_ties_within_five_percent_prefer_fewer_workers():
    clock = FakeClock()
    build, _ = clocked_loader_factory(clock, {4: 0.0104, 8: 0.0100, 12: 0.0200})
    choice = autotune_num_workers(build, [4, 8, 12], warmup_steps=2, measure_steps=10, cpu_count=16, clock=clock)
    assert choice.num_workers == 4 and "fewer workers" in choice.reason
    assert choice.data_time_s[8] == pytest.approx(0.0100)


def test_clear_winner_beyond_tolerance():
    clock = FakeClock()
    build, _ = clocked_loader_factory(clock, {4: 0.020, 8: 0.010})
    choice = autotune_num_workers(build, [8, 4], warmup_steps=2, measure_steps=10, cpu_count=16, clock=clock)
    assert choice.num_workers == 8 and choice.measured_steps == {4: 10, 8: 10}


def test_candidates_clipped_to_cores_and_never_empty():
    assert clip_candidates([4, 8, 12, 16], 8) == ([4, 8], [12, 16])
    assert clip_candidates([4, 8], 2) == ([2], [4, 8])
    with pytest.raises(ValueError):
        clip_candidates([], 4)
    clock = FakeClock()
    build, built = clocked_loader_factory(clock, {2: 0.01})
    choice = autotune_num_workers(build, [4, 8, 12, 16], 1, 3, cpu_count=2, clock=clock)
    assert built == [2] and choice.num_workers == 2 and choice.skipped == [4, 8, 12, 16]


def test_short_loader_measures_what_it_has_and_empty_one_is_an_error():
    clock = FakeClock()
    build, _ = clocked_loader_factory(clock, {1: 0.01}, batches=4)
    choice = autotune_num_workers(build, [1], warmup_steps=2, measure_steps=10, cpu_count=2, clock=clock)
    assert choice.measured_steps[1] == 2
    build, _ = clocked_loader_factory(clock, {1: 0.01}, batches=2)
    with pytest.raises(ValueError, match="no batch"):
        autotune_num_workers(build, [1], warmup_steps=2, measure_steps=10, cpu_count=2, clock=clock)
