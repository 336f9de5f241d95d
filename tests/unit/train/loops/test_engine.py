"""The training loop, for both strategies: checkpoints, metrics, D-10 lines and Annex 7 tags per model, exact
resume, re-runs that re-run, warm start, EMA in best.pt, per-model epochs, plans, compile fallback."""
import json
import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pillsnap.core.checkpoints import (CheckpointMismatchError, check_compatible, find_resume_checkpoint,
                                      load_checkpoint, save_checkpoint)
from pillsnap.train import SimulatedCrash, train_stage
from pillsnap.train.services.policy import resolve_policy
from pillsnap.train.services.telemetry import STEP_TAGS
from tests.unit.train.support import STRATEGIES, assert_same_weights, final_weights, run

pytestmark = pytest.mark.slow


def _tags(tb_dir):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trains_and_writes_checkpoints_metrics_log_lines_and_tags(make_config, tmp_path, tiny_stage, caplog,
                                                                  strategy):
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        results = run(make_config, tmp_path, tiny_stage, strategy)
    cls = results["classifier"]
    assert cls.epochs_completed == 2 and cls.global_step == 12 and cls.strategy == strategy
    ckpts = tmp_path / "stage_1/checkpoints"
    for name in ("best.pt", "last.pt", "recovery.pt"):
        assert (ckpts / name).is_file()
    last = load_checkpoint(ckpts / "last.pt")
    for key in ("model", "units", "epoch", "global_step", "best_metric", "config", "fingerprint", "class_map_hash",
                "k_codes", "rng", "backbone", "num_classes"):
        assert key in last
    unit_state = last["units"]["classifier"]
    assert {"optimizer", "scheduler", "scaler", "meta_json"} <= set(unit_state)
    metrics = json.loads((tmp_path / "stage_1/reports/metrics.json").read_text())
    assert len(metrics["classification"]["history"]) == 2
    assert {"accuracy", "macro_f1", "top5", "val_loss", "n"} <= set(metrics["classification"]["latest"]["val"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("[train] e=2/2 s=6/6 loss=") and "thr=" in line and "host=" in line for line in lines)
    assert any("device=cpu amp=off" in line for line in lines)
    tags = _tags(tmp_path / "stage_1/tb")
    assert set(STEP_TAGS) | {"perf/host_mem", "val/accuracy", "val/macro_f1", "val/loss"} <= set(tags)
    assert "perf/cuda_mem" not in tags and min(tags["perf/host_mem"]) > 0  # measured memory, not a placeholder 0
    assert len(tags["train/loss"]) == 12
    det = results["detector"]  # the same loop trains the detector in both strategies
    assert det.epochs_completed == 2 and det.global_step == 2 and det.monitor == "mAP_0.5" and det.strategy == strategy
    assert (tmp_path / "stage_1/detector/checkpoints/best.pt").is_file()
    assert len(metrics["detection"]["history"]) == 2 and "mAP_0.5" in metrics["detection"]["latest"]["val"]
    assert any(line.startswith("[train/det] e=2/2 s=1/1 loss=") for line in lines)
    det_tags = _tags(tmp_path / "stage_1/detector/tb")
    assert set(STEP_TAGS) | {"perf/host_mem", "val/mAP_0.5", "train/box_loss"} <= set(det_tags)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_an_interrupted_run_resumes_to_identical_weights(make_config, tmp_path, tiny_stage, strategy):
    # The shipped single photos (mosaic partners drawn from a subset); mosaic in the first epoch, closed in the second.
    shipped = ("detection.include_single_images=true", "detection.close_mosaic_epochs=1")
    run(make_config, tmp_path / "a", tiny_stage, strategy, *shipped)
    with pytest.raises(SimulatedCrash):
        run(make_config, tmp_path / "b", tiny_stage, strategy, *shipped, "train.crash_at_step=5")
    resumed = run(make_config, tmp_path / "b", tiny_stage, strategy, *shipped, "train.crash_at_step=5")
    assert resumed["classifier"].resumed_from_step == 4  # recovery every 2 ticks: the crash at 5 loses tick 5
    assert_same_weights(final_weights(tmp_path / "a/stage_1"), final_weights(tmp_path / "b/stage_1"))


def test_corrupt_checkpoint_falls_back_to_an_earlier_one(make_config, tmp_path, tiny_stage, caplog):
    run(make_config, tmp_path, tiny_stage, "sequential")
    ckpts = tmp_path / "stage_1/checkpoints"
    (ckpts / "recovery.pt").write_bytes((ckpts / "recovery.pt").read_bytes()[:1000])  # truncated
    last = ckpts / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path, payload = find_resume_checkpoint(ckpts)
    assert path.name == "last.prev.pt" and payload["epoch"] == 1
    assert sum("unreadable checkpoint" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_rerun_with_new_settings_archives_and_starts_fresh(make_config, tmp_path, tiny_stage, strategy):
    run(make_config, tmp_path, tiny_stage, strategy)
    # Serving, reporting and run-control keys change nothing training computes: the finished run is continued.
    again = run(make_config, tmp_path, tiny_stage, strategy, "serve.smoke_requests=5", "train.step_log_interval=1",
                "evaluation.checks.multi_batch_size=4")
    assert again["classifier"].resumed_from_step is not None and again["classifier"].global_step == 12
    assert not (tmp_path / "stage_1/checkpoints.previous").exists()
    optimized = run(make_config, tmp_path, tiny_stage, strategy, "train.classification.lr=0.001")
    assert optimized["classifier"].resumed_from_step is None and optimized["classifier"].global_step == 12
    (archive,) = (tmp_path / "stage_1/checkpoints.previous").iterdir()
    assert {p.name for p in archive.iterdir()} == {"checkpoints", "detector__checkpoints"}
    old = load_checkpoint(archive / "checkpoints" / "last.pt")
    assert json.loads(old["config"])["train"]["classification"]["lr"] == 0.003  # the old run, kept


def test_a_run_on_other_photos_or_with_a_replaced_best_pt_never_resumes(make_config, tmp_path, tiny_stage):
    """Issue 28, reproduction 1: a run on 24 photos "resumed" a finished run on 48 and trained nothing. The data it
    trains on (the subset's row hash) is in the fingerprint, and each best.pt's sha256 is recorded: a run whose
    best.pt was replaced by another run's model is not resumed either."""
    import shutil

    from pillsnap.core.identity import file_sha256

    m, cmap = tiny_stage
    first = run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",))["classifier"]
    best = tmp_path / "stage_1/checkpoints/best.pt"
    assert first.best_sha256 == file_sha256(best) and first.data_identity["subset"]
    fewer = m.drop(m[(m.split == "train") & (m.kind == "single")].index[::2])
    other = run(make_config, tmp_path, (fewer, cmap), "sequential", models=("classifier",))["classifier"]
    assert other.resumed_from_step is None and other.global_step > 0  # trained, on its own photos
    assert other.data_identity["subset"] != first.data_identity["subset"] and other.fingerprint != first.fingerprint
    (archived,) = (tmp_path / "stage_1/checkpoints.previous").iterdir()
    shutil.copy(archived / "checkpoints" / "best.pt", best)  # the first run's model where this run's best.pt was
    again = run(make_config, tmp_path, (fewer, cmap), "sequential", models=("classifier",))["classifier"]
    assert again.resumed_from_step is None and again.best_sha256 == file_sha256(best) != first.best_sha256
    assert len(list((tmp_path / "stage_1/checkpoints.previous").iterdir())) == 2


def test_a_different_label_space_trains_fresh_and_its_checkpoints_name_both_sides(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",))
    fewer = m[m.k_code.isin(cmap.k_codes[:4]) | (m.kind == "combination")]
    again = run(make_config, tmp_path, (fewer, cmap), "sequential", models=("classifier",))["classifier"]
    assert again.resumed_from_step is None  # other photos: another fingerprint, the old run archived
    (archived,) = (tmp_path / "stage_1/checkpoints.previous").iterdir()
    with pytest.raises(CheckpointMismatchError, match="num_classes: checkpoint 6 vs current 4"):
        check_compatible(load_checkpoint(archived / "checkpoints/last.pt"), "test_efficientnet", 4,
                         again.class_map_hash)


def test_warm_start_remaps_the_head_by_kcode(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path)
    train_stage(cfg, m[m.k_code.isin(cmap.k_codes[:4])], cmap, 1, tmp_path / "s1", show_progress=False,
                models=("classifier",))
    old = load_checkpoint(tmp_path / "s1/checkpoints/best.pt")
    second = cmap.restrict(cmap.k_codes[2:])  # keeps classes 2, 3; adds 4, 5
    from tests.unit.train.conftest import classifier_member

    unit = classifier_member(cfg, m[m.k_code.isin(second.k_codes)], cmap, tmp_path / "s2",
                             init_checkpoint=tmp_path / "s1/checkpoints/best.pt").unit
    first = cmap.restrict(cmap.k_codes[:4])
    head = [k for k in old["model"] if k.startswith("classifier.")]
    new_state = unit.model.state_dict()
    for key in head:
        for code in cmap.k_codes[2:4]:
            assert torch.equal(new_state[key][second.index[code]], old["model"][key][first.index[code]])
    backbone_key = next(k for k in old["model"] if not k.startswith("classifier.") and old["model"][k].dtype.is_floating_point)
    assert torch.equal(new_state[backbone_key], old["model"][backbone_key])


def test_interleaved_warm_starts_both_models_from_the_previous_stage(make_config, tmp_path, tiny_stage):
    run(make_config, tmp_path / "prev", tiny_stage, "interleaved")
    prev = tmp_path / "prev/stage_1"
    init = {"classifier": prev / "checkpoints/best.pt", "detector": prev / "detector/checkpoints/best.pt"}
    seen = {}

    def first_step(tick, loss, model):
        seen.setdefault(model, loss)

    run(make_config, tmp_path / "next", tiny_stage, "interleaved", "train.classification.epochs=1",
        "train.detection.epochs=1", init_checkpoints=init, step_hook=first_step)
    fresh = {}
    run(make_config, tmp_path / "fresh", tiny_stage, "interleaved", "train.classification.epochs=1",
        "train.detection.epochs=1", step_hook=lambda t, loss, model: fresh.setdefault(model, loss))
    assert seen["classifier"] < fresh["classifier"]  # it starts where the previous stage ended
    assert seen["detector"] < fresh["detector"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_best_pt_holds_the_ema_weights_that_were_evaluated(make_config, tmp_path, tiny_stage, strategy):
    results = run(make_config, tmp_path, tiny_stage, strategy, "train.ema.enabled=true", "train.ema.decay=0.5")
    last = load_checkpoint(tmp_path / "stage_1/checkpoints/last.pt")
    for model, folder in (("classifier", "checkpoints"), ("detector", "detector/checkpoints")):
        if model not in results:
            continue
        ema = last["units"][model]["ema"]
        raw = last["model"] if model == "classifier" else last["units"][model]["model"]
        differs = [k for k in raw if raw[k].dtype.is_floating_point and not torch.equal(raw[k], ema[k])]
        assert differs, f"{model}: EMA weights must differ from the raw weights"
        r = results[model]
        if r.best_epoch == r.epochs_completed:  # best.pt was written at the last epoch: it holds that EMA
            best = load_checkpoint(tmp_path / "stage_1" / folder / "best.pt")
            assert all(torch.equal(best["model"][k], ema[k].float()) for k in differs)


def test_each_model_keeps_its_own_epochs(make_config, tmp_path, tiny_stage):
    order = []
    results = run(make_config, tmp_path, tiny_stage, "interleaved", "train.detection.epochs=1",
                  "train.classification.epochs=3", step_hook=lambda tick, loss, model: order.append(model))
    assert results["detector"].epochs_completed == 1 and results["detector"].global_step == 1
    assert results["classifier"].epochs_completed == 3 and results["classifier"].global_step == 18
    assert order[:2] == ["detector", "classifier"] and order[2:] == ["classifier"] * 17  # the detector stopped


def test_sequential_is_the_same_loop_with_the_detectors_epochs_first(make_config, tmp_path, tiny_stage):
    order = []
    results = run(make_config, tmp_path, tiny_stage, "sequential", "train.detection.epochs=2",
                  "train.classification.epochs=1", step_hook=lambda tick, loss, model: order.append(model))
    assert order == ["detector"] * 2 + ["classifier"] * 6
    assert results["detector"].epochs_completed == 2 and results["classifier"].epochs_completed == 1


def test_batch_and_worker_plans_are_applied_and_scale_the_lr(make_config, tmp_path, tiny_stage):
    plan = {"batch_size": 4, "grad_accum": 1, "eval_batch_size": 16, "probed": True, "device": "test"}
    result = run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",),
                 plans={"classifier": {"batch": plan, "workers": {"num_workers": 0, "reason": "test"}}})["classifier"]
    assert (result.batch_size, result.grad_accum) == (4, 1) and result.global_step == 24
    assert result.auto_batch["applied_lr_scale"] == 0.5 and result.num_workers["reason"] == "test"
    history = result.history
    assert history[0]["batch_size"] == 4
    tags = _tags(tmp_path / "stage_1/tb")
    assert tags["perf/auto_batch_found"] == [4.0] and tags["perf/num_workers"] == [0.0]


def test_a_compile_failure_at_the_first_step_falls_back_to_eager_and_trains_the_same(
        make_config, tmp_path, tiny_stage, caplog):
    strategy = "interleaved"  # the shipped one; both strategies run the same guard (test_optimized_path.py too)
    def exploding_backend(gm, example_inputs):
        raise RuntimeError("this backend cannot compile")

    policy = resolve_policy(make_config(tmp_path).optimization)
    compiled = type(policy)(**{**policy.__dict__, "compile_mode": "reduce-overhead"})
    with caplog.at_level(logging.WARNING):
        results = run(make_config, tmp_path / "c", tiny_stage, strategy, policy=compiled,
                      compile_backend=exploding_backend)
    assert all(r.compile == "fell_back" for r in results.values())
    warnings = [r for r in caplog.records if "falling back to eager" in r.getMessage()]
    assert len(warnings) == len(results)  # one warning per model
    run(make_config, tmp_path / "e", tiny_stage, strategy)
    assert_same_weights(final_weights(tmp_path / "c/stage_1"), final_weights(tmp_path / "e/stage_1"))


def test_monitor_warnings_and_a_serialisable_result(make_config, tmp_path, tiny_stage):
    result = run(make_config, tmp_path, tiny_stage, "sequential", "train.max_steps_per_epoch=1",
                 "train.classification.epochs=3", "train.early_stopping.monitor=val_loss",
                 "train.early_stopping.mode=min", "train.early_stopping.min_delta=100")["classifier"]
    (plateau,) = [w for w in result.warnings if w["kind"] == "plateau"]
    assert plateau["epoch"] == 3 and "lower the learning rate" in plateau["message"]
    out = json.loads(json.dumps(result.as_dict()))
    assert {"oom_events", "auto_batch", "num_workers", "warnings", "batch_size", "grad_accum", "compile"} <= set(out)
    assert out["warnings"] == result.warnings and out["oom_events"] == [] and out["auto_batch"] is None


def test_a_checkpoint_from_another_number_of_processes_is_refused_by_name(make_config, tmp_path, tiny_stage):
    run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",))
    checkpoints = sorted((tmp_path / "stage_1/checkpoints").glob("*.pt"))

    def rewrite(rng):
        for path in checkpoints:
            payload = load_checkpoint(path)
            if "rng" in payload:  # the whole-run checkpoints a resume reads (best.pt holds weights only)
                payload["rng"] = rng(payload["rng"])
                save_checkpoint(path, payload)

    rewrite(lambda per_rank: per_rank[0])  # as one process wrote it before several could train
    again = run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",))["classifier"]
    assert again.resumed_from_step is not None
    rewrite(lambda one: [one, one])  # as 2 ranks wrote it
    with pytest.raises(CheckpointMismatchError, match=r"written by 2 training process\(es\), this run has 1 "
                                                      r"\(train\.distributed\.nproc_per_node=1\)"):
        run(make_config, tmp_path, tiny_stage, "sequential", models=("classifier",))
