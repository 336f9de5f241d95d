import random

import numpy as np

from pillsnap.train.data import SeededItems


class GlobalRandomDataset:
    """Draws from the global generators, as ultralytics' augmentations do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        return index, random.random(), float(np.random.rand())


def test_a_detector_sample_depends_on_its_position_not_on_who_drew_from_the_global_generators():
    items = SeededItems(GlobalRandomDataset())
    first = items[(3, 1234)]
    random.random(), np.random.rand(3)  # another thread or an earlier batch drew meanwhile
    assert items[(3, 1234)] == first
    assert items[(3, 1235)] != first and items[(3, 1235)][0] == 3
