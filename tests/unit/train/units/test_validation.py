"""Validation on every rank: each rank predicts its slice of the validation samples (classifier: position, label,
top-5 and loss; detector: each photo's matches), the ranks gather them, and the figures equal one process's (no
sample twice, none left out)."""
import threading

import numpy as np
import pytest

from pillsnap.train.loops.members import detector_member, run_policy
from pillsnap.train.services.collectives import Collectives
from tests.unit.train.conftest import classifier_member


class ThreadRank(Collectives):
    """Rank r of a 2-rank group whose ranks are threads of this process: `gather` meets the other at a barrier."""

    def __init__(self, rank: int, box: list, barrier: threading.Barrier):
        super().__init__(rank, 2)
        self.box, self.barrier, self.sent = box, barrier, None

    def gather(self, obj):
        self.sent = self.box[self.rank] = obj
        self.barrier.wait()
        out = list(self.box)
        self.barrier.wait()
        return out


def _validate_on_two_ranks(units):
    """Each unit's validate() on its own thread, as two ranks: (rank 0's metrics, rank 1's, what each sent)."""
    box, barrier = [None, None], threading.Barrier(2, timeout=120)
    comms = [ThreadRank(r, box, barrier) for r in (0, 1)]
    results = [None, None]

    def run(r):
        results[r] = units[r].validate(comms[r])
    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results, [c.sent for c in comms]


def test_two_ranks_validate_the_classifier_apart_and_gather_the_figures_of_one_process(make_config, tmp_path,
                                                                                      tiny_stage):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "data.include_combination_crops=true")
    one = classifier_member(cfg, m, cmap, tmp_path / "one", comm=Collectives()).unit
    ranks = [classifier_member(cfg, m, cmap, tmp_path / f"rank{r}", comm=Collectives(r, 2)).unit for r in (0, 1)]
    for unit in ranks:
        unit.model.load_state_dict(one.model.state_dict())
    n = len(one.val_loader.dataset)
    slices = [list(unit.val_loader.sampler) for unit in ranks]
    assert sorted(slices[0] + slices[1]) == list(range(n)) and abs(len(slices[0]) - len(slices[1])) <= 1
    (gathered, other), sent = _validate_on_two_ranks(ranks)
    assert [sorted(s[:, 0].astype(int).tolist()) for s in sent] == slices  # each rank sends its own samples only
    alone = one.validate()
    assert alone["n"] == gathered["n"] == n >= 10 and other == gathered
    for key in ("accuracy", "macro_f1", "top5", "per_class_f1_min", "per_class_min_top1", "classes_evaluated",
                "worst_classes"):
        assert gathered[key] == alone[key], key
    assert gathered["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)


def test_two_ranks_score_the_detector_apart_and_gather_the_figures_of_one_process(make_config, tmp_path, tiny_stage):
    m, _ = tiny_stage
    cfg = make_config(tmp_path, "detection.include_single_images=true")
    one = detector_member(cfg, m, 1, tmp_path / "one", run_policy(cfg), comm=Collectives()).unit
    ranks = [detector_member(cfg, m, 1, tmp_path / f"rank{r}", run_policy(cfg), comm=Collectives(r, 2)).unit
             for r in (0, 1)]
    for unit in ranks:
        unit.model.load_state_dict(one.model.state_dict())
    (gathered, other), sent = _validate_on_two_ranks(ranks)
    photos = len(one.val_samples)
    assert [sorted(s) for s in sent] == [list(range(0, photos, 2)), list(range(1, photos, 2))]
    alone = one.validate()
    assert gathered["n_images"] == alone["n_images"] == photos >= 4 and other == gathered
    for key, value in alone.items():
        assert gathered[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_the_top_five_of_the_logits_start_with_the_argmax():
    from pillsnap.metrics.classification import classification_metrics, metrics_from_top, top_predictions

    logits = np.random.default_rng(0).normal(size=(200, 40)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 40, 200)
    top = top_predictions(logits)
    assert (top[:, 0] == logits.argmax(1)).all()
    assert (np.sort(top, 1) == np.sort(np.argsort(-logits, 1)[:, :5], 1)).all()
    assert metrics_from_top(labels, top) == classification_metrics(labels, logits)


def test_the_classifier_validates_in_loader_workers_that_end_with_the_pass(make_config, tmp_path, tiny_stage,
                                                                           monkeypatch):
    """JPEG rows decode in the validation loader's workers; none outlives the pass (the memory check, which sums
    the process and its children at the epoch's end, must not read them as a leak); the figures equal in-process
    validation's."""
    import psutil

    import pillsnap.train.data as train_data

    monkeypatch.setattr(train_data, "ROWS_PER_VAL_WORKER", 1)  # the tiny stage's few rows: as many as a release's
    m, cmap = tiny_stage
    jpeg = "dataloader.cache.format=jpeg"
    in_process = classifier_member(make_config(tmp_path / "a", jpeg, "dataloader.num_workers=0"), m, cmap,
                                   tmp_path / "a").unit
    cfg = make_config(tmp_path / "b", jpeg, "dataloader.num_workers=2", "dataloader.persistent_workers=true")
    unit = classifier_member(cfg, m, cmap, tmp_path / "b").unit
    unit.model.load_state_dict(in_process.model.state_dict())
    assert unit.val_loader.num_workers == 2 and not unit.val_loader.persistent_workers
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    metrics = unit.validate()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    alone = in_process.validate()
    for key in ("n", "accuracy", "macro_f1", "top5"):
        assert metrics[key] == alone[key], key


def test_validation_starts_only_the_workers_that_pay_for_their_start(tmp_path):
    """A worker's start (a fresh interpreter) is repaid by ~2,000 JPEG decodes; raw rows never repay one."""
    from pillsnap.data.cache import PixelStore
    from pillsnap.data.row_format import RowFormat
    from pillsnap.train.data import ROWS_PER_VAL_WORKER, val_loader_workers

    jpeg, raw = PixelStore(tmp_path, 64, 0.0, RowFormat("jpeg", 90)), PixelStore(tmp_path, 64)
    assert val_loader_workers(50_000, jpeg, 8) == 8  # Stage 4's slice of a rank
    assert val_loader_workers(3 * ROWS_PER_VAL_WORKER, jpeg, 8) == 3
    assert val_loader_workers(ROWS_PER_VAL_WORKER - 1, jpeg, 8) == 0
    assert val_loader_workers(50_000, raw, 8) == 0 and val_loader_workers(50_000, None, 8) == 8
