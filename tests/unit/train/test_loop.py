"""The classifier loop: checkpoints, resume (exact), corrupt-file fallback, mismatches, warm start, metrics."""
import json
import logging

import pytest
import torch

from pillsnap.train.checkpoints import CheckpointMismatchError, find_resume_checkpoint, load_checkpoint
from pillsnap.train.loop import ClassifierTrainer, SimulatedCrash, train_classifier


def _trainer(make_config, tmp_path, tiny_stage, *overrides, out="stage_1"):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "train.deterministic=true", *overrides)
    labels = cmap.restrict(m.loc[m.kind == "single", "k_code"])
    return ClassifierTrainer(cfg, m, labels, tmp_path / out, show_progress=False)


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_trains_and_writes_checkpoints_metrics_and_log_lines(make_config, tmp_path, tiny_stage, caplog):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        result = train_classifier(cfg, m, cmap, tmp_path / "s1", show_progress=False)
    assert result.epochs_completed == 2 and result.global_step > 0
    for name in ("best.pt", "last.pt", "recovery.pt"):
        assert (tmp_path / "s1/checkpoints" / name).is_file()
    payload = load_checkpoint(tmp_path / "s1/checkpoints/last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_metric", "config",
                "class_map_hash", "k_codes", "rng", "backbone", "num_classes"):
        assert key in payload
    metrics = json.loads((tmp_path / "s1/reports/metrics.json").read_text())["classification"]
    assert len(metrics["history"]) == 2 and {"accuracy", "macro_f1", "top5", "val_loss", "n"} <= set(metrics["latest"]["val"])
    assert any("[train] e=" in r.getMessage() and "thr=" in r.getMessage() for r in caplog.records)
    assert any("device=cpu amp=off" in r.getMessage() for r in caplog.records)


def test_interrupted_run_resumes_to_identical_weights(make_config, tmp_path, tiny_stage):
    straight = _trainer(make_config, tmp_path / "a", tiny_stage)
    straight.run()
    crashing = _trainer(make_config, tmp_path / "b", tiny_stage, "train.crash_at_step=5")
    with pytest.raises(SimulatedCrash):
        crashing.run()
    resumed = _trainer(make_config, tmp_path / "b", tiny_stage, "train.crash_at_step=5")
    result = resumed.run()
    assert result.resumed_from_step == 4  # recovery every 2 steps: the crash at 5 loses only step 5
    assert _same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert result.global_step == straight.state.global_step


def test_corrupt_checkpoint_falls_back_to_an_earlier_one(make_config, tmp_path, tiny_stage, caplog):
    _trainer(make_config, tmp_path, tiny_stage).run()
    ckpts = tmp_path / "stage_1/checkpoints"
    (ckpts / "recovery.pt").write_bytes((ckpts / "recovery.pt").read_bytes()[:1000])  # truncated
    last = ckpts / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path, payload = find_resume_checkpoint(ckpts)
    assert path.name == "last.prev.pt" and payload["epoch"] == 1
    assert sum("unreadable checkpoint" in r.getMessage() for r in caplog.records) == 2


def test_mismatched_checkpoint_names_both_sides(make_config, tmp_path, tiny_stage):
    _trainer(make_config, tmp_path, tiny_stage).run()
    other = _trainer(make_config, tmp_path, tiny_stage, "classification.backbone=resnet10t")
    with pytest.raises(CheckpointMismatchError, match="backbone: checkpoint 'test_efficientnet' vs config 'resnet10t'"):
        other.run()
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "train.deterministic=true")
    fewer = cmap.restrict(cmap.k_codes[:4])
    trainer = ClassifierTrainer(cfg, m[m.k_code.isin(fewer.k_codes)], fewer, tmp_path / "stage_1", show_progress=False)
    with pytest.raises(CheckpointMismatchError, match="num_classes: checkpoint 6 vs current 4"):
        trainer.run()


def test_warm_start_remaps_the_head_by_kcode(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path)
    first = cmap.restrict(cmap.k_codes[:4])
    train_classifier(cfg, m[m.k_code.isin(first.k_codes)], cmap, tmp_path / "s1", show_progress=False)
    old = load_checkpoint(tmp_path / "s1/checkpoints/best.pt")
    second = cmap.restrict(cmap.k_codes[2:])  # keeps classes 2, 3; adds 4, 5
    trainer = ClassifierTrainer(cfg, m[m.k_code.isin(second.k_codes)], second, tmp_path / "s2", init_checkpoint=tmp_path / "s1/checkpoints/best.pt",
                                show_progress=False)
    head = [k for k in old["model"] if k.startswith("classifier.")]
    new_state = trainer.model.state_dict()
    for key in head:
        for code in cmap.k_codes[2:4]:
            assert torch.equal(new_state[key][second.index[code]], old["model"][key][first.index[code]])
    backbone_key = next(k for k in old["model"] if not k.startswith("classifier.") and old["model"][k].dtype.is_floating_point)
    assert torch.equal(new_state[backbone_key], old["model"][backbone_key])


def test_ema_weights_are_validated_logged_and_saved(make_config, tmp_path, tiny_stage):
    trainer = _trainer(make_config, tmp_path, tiny_stage, "train.ema.enabled=true", "train.ema.decay=0.5")
    result = trainer.run()
    history = json.loads((tmp_path / "stage_1/reports/metrics.json").read_text())["classification"]["history"]
    assert all(h["val_ema"] is not None and "accuracy" in h["val_ema"] for h in history)
    best = load_checkpoint(tmp_path / "stage_1/checkpoints/best.pt")
    last = load_checkpoint(tmp_path / "stage_1/checkpoints/last.pt")
    assert last["ema"] is not None
    ema_state = trainer.ema.module.state_dict()
    raw_state = trainer.model.state_dict()
    differs = [k for k in raw_state if raw_state[k].dtype.is_floating_point and not torch.equal(raw_state[k], ema_state[k])]
    assert differs, "EMA weights must differ from the raw weights"
    if result.best_epoch == result.epochs_completed:  # best.pt carries the EMA weights that were evaluated
        assert all(torch.equal(best["model"][k], ema_state[k]) for k in differs)
