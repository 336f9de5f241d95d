import random
import threading
import time
from pathlib import Path

import numpy as np

from pillsnap.data.yolo_dataset import stage_detector_dataset
from pillsnap.lock import wait_for_lock
from pillsnap.train.data import LABELS_LOCK, SeededItems, detector_data
from pillsnap.train.units.detector import detector_hyperparameters


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


def test_the_ranks_take_turns_at_ultralytics_label_cache(make_config, tmp_path, tiny_stage):
    """ultralytics rewrites labels/train.cache in place: a rank must not read it while another writes it."""
    cfg = make_config(tmp_path)
    manifest, _ = tiny_stage
    yolo, _ = stage_detector_dataset(cfg, manifest, 1)
    cache = Path(yolo.root) / "labels" / "train.cache"
    done = threading.Event()
    with wait_for_lock(Path(yolo.root) / LABELS_LOCK):  # another rank is building it
        worker = threading.Thread(target=lambda: (detector_data(cfg, manifest, 1, detector_hyperparameters(cfg), 1),
                                                  done.set()), daemon=True)
        worker.start()
        time.sleep(1.5)
        assert not done.is_set() and not cache.exists()
    worker.join(120)
    assert done.is_set() and cache.is_file()
