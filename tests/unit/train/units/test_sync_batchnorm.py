"""train.distributed.sync_batchnorm: under several ranks every BatchNorm of both models becomes a synchronised one
(timm's BatchNormAct2d keeps its activation) over the same Parameters the optimizer holds; one process keeps its
own BatchNorms; an OOM with synchronised BatchNorm stops with the key named instead of hanging the other ranks."""
import pytest
import torch

from pillsnap.config import ConfigError
from pillsnap.train.loops.members import detector_member, run_policy
from pillsnap.train.services.collectives import Collectives
from tests.unit.train.conftest import classifier_member


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_several_ranks_synchronise_every_batchnorm_of_both_models(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "train.distributed.sync_batchnorm=true")
    two_ranks = Collectives(0, 2)  # no process group needed to build the units
    classifier = classifier_member(cfg, m, cmap, tmp_path / "stage_1", comm=two_ranks).unit
    detector = detector_member(cfg, m, 1, tmp_path / "stage_1", run_policy(cfg), comm=two_ranks).unit
    for unit in (classifier, detector):
        norms = _batchnorms(unit.model)
        assert norms and all(isinstance(n, torch.nn.SyncBatchNorm) for n in norms), unit.name
        optimized = {id(p) for g in unit.optimizer.param_groups for p in g["params"]}
        assert {id(p) for p in unit.model.parameters() if p.requires_grad} <= optimized, unit.name
    acts = [n for n in _batchnorms(classifier.model) if hasattr(n, "act")]
    assert acts and not all(isinstance(n.act, torch.nn.Identity) for n in acts)  # the activation survived
    one = classifier_member(cfg, m, cmap, tmp_path / "one", comm=Collectives()).unit
    assert not any(isinstance(n, torch.nn.SyncBatchNorm) for n in _batchnorms(one.model))


def test_an_oom_with_synchronised_batchnorm_names_the_key(make_config, tmp_path, tiny_stage, monkeypatch):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "train.distributed.sync_batchnorm=true")
    member = classifier_member(cfg, m, cmap, tmp_path / "stage_1", comm=Collectives(0, 2))
    monkeypatch.setattr(member.unit, "batch_len", lambda batch: 1)
    monkeypatch.setattr(member.unit, "forward_backward", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory (test)")))
    with pytest.raises(ConfigError, match=r"sync_batchnorm=true.*train\.classification\.batch_size"):
        member.guard.step(["one photo"], 1, 0, lambda: tmp_path / "emergency.pt")
