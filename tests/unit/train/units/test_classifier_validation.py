"""Classifier validation on every rank: each rank predicts its slice of the validation samples, the ranks gather
position, label, top-5 and loss, and the figures equal one process's (no sample twice, none left out)."""
import numpy as np
import pytest

from pillsnap.train.services.collectives import Collectives
from tests.unit.train.conftest import classifier_member


class GatherFrom(Collectives):
    """Rank r of a 2-rank group without a process group: `gather` returns what the other rank sent."""

    def __init__(self, rank: int, other=np.zeros((0, 0))):
        super().__init__(rank, 2)
        self.other, self.sent = other, None

    def gather(self, obj):
        self.sent = obj
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


def test_two_ranks_validate_apart_and_gather_the_figures_of_one_process(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "data.include_combination_crops=true")
    one = classifier_member(cfg, m, cmap, tmp_path / "one", comm=Collectives()).unit
    ranks = [classifier_member(cfg, m, cmap, tmp_path / f"rank{r}", comm=Collectives(r, 2)).unit for r in (0, 1)]
    for unit in ranks:
        unit.model.load_state_dict(one.model.state_dict())
    n = len(one.val_loader.dataset)
    slices = [list(unit.val_loader.sampler) for unit in ranks]
    assert sorted(slices[0] + slices[1]) == list(range(n)) and abs(len(slices[0]) - len(slices[1])) <= 1

    rank_1 = GatherFrom(1)
    ranks[1].validate(rank_1)  # what rank 1 sends: its own samples only
    assert sorted(rank_1.sent[:, 0].astype(int).tolist()) == slices[1]
    gathered = ranks[0].validate(GatherFrom(0, other=rank_1.sent))
    alone = one.validate()
    assert alone["n"] == gathered["n"] == n >= 10
    for key in ("accuracy", "macro_f1", "top5", "per_class_f1_min", "per_class_min_top1", "classes_evaluated",
                "worst_classes"):
        assert gathered[key] == alone[key], key
    assert gathered["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)


def test_the_top_five_of_the_logits_start_with_the_argmax():
    from pillsnap.metrics.classification import classification_metrics, metrics_from_top, top_predictions

    logits = np.random.default_rng(0).normal(size=(200, 40)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 40, 200)
    top = top_predictions(logits)
    assert (top[:, 0] == logits.argmax(1)).all()
    assert (np.sort(top, 1) == np.sort(np.argsort(-logits, 1)[:, :5], 1)).all()
    assert metrics_from_top(labels, top) == classification_metrics(labels, logits)
