"""Auto batch (D-4) and worker autotune (Annex 2) for both models as library calls; stage settings (D-13)."""
import json
import logging

import pytest

from pillsnap.train import stage_config, tune_batch, tune_workers
from pillsnap.train.tuning.autobatch import HOST_REASON, AutoBatchError
from pillsnap.train.tuning.plans import worker_candidates
from pillsnap.train.tuning.workers import available_cores
from tests.unit.train.support import run


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_worker_autotune_measures_each_models_real_loader(make_config, tmp_path, tiny_stage, model):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, "dataloader.autotune_workers=true", "dataloader.autotune_candidates=[0,1,16]",
                      "dataloader.persistent_workers=false")
    plan = tune_workers(cfg, m, cmap, model, 1, batch_size=2)
    usable = [c for c in plan["candidates"] if c <= available_cores()]
    assert plan["model"] == model and plan["num_workers"] in usable and 16 in plan["skipped"]
    assert set(plan["data_time_ms"]) == {str(c) for c in usable}
    assert all(plan["measured_steps"][str(c)] >= 1 for c in usable)
    json.dumps(plan)


def test_worker_candidates_grow_only_on_small_machines():
    assert worker_candidates([4, 8, 12, 16], cores=2) == [1, 2, 4, 8, 12, 16]  # 4..16 are then skipped
    assert worker_candidates([4, 8, 12, 16], cores=16) == [4, 8, 12, 16]


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_auto_batch_on_a_cpu_probes_host_memory_with_real_steps(make_config, tmp_path, tiny_stage, model):
    m, cmap = tiny_stage
    key = "classification" if model == "classifier" else "detection"
    off = make_config(tmp_path, f"train.{key}.auto_batch_tune=false")
    unprobed = tune_batch(off, m, cmap, model)
    assert "auto_batch_tune=false" in unprobed["reasons"][0] and unprobed["probed"] is False
    cfg = make_config(tmp_path)  # tuning on, as shipped
    plan = tune_batch(cfg, m, cmap, model)
    configured = getattr(cfg.train, key).batch_size
    assert plan["probed"] and plan["device"] == "cpu (host memory)" and HOST_REASON in plan["reasons"]
    assert (plan["batch_size"], plan["grad_accum"], plan["eval_batch_size"]) == (configured, 1, configured)
    assert plan["probes"] and all(isinstance(peak, int) and peak > 0 for _, peak in plan["probes"])
    assert 0 < plan["memory_fraction"] < 1
    json.dumps(plan)


def test_a_cpu_batch_over_the_host_headroom_is_refused(make_config, tmp_path, tiny_stage):
    """Bad evidence for the host probe: a 'host' so small that the configured batch's real peak exceeds it."""
    m, cmap = tiny_stage
    import psutil

    rss = psutil.Process().memory_info().rss
    cfg = make_config(tmp_path, "train.classification.batch_size=4")
    with pytest.raises(AutoBatchError, match="min batch 2"):  # not even the smallest batch fits a host of the current RSS
        tune_batch(cfg, m, cmap, "classifier", device_total_bytes=rss)


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_probes_drive_the_search_for_either_model(make_config, tmp_path, tiny_stage, model):
    # Fake probes stand in for CUDA: 5 MiB per sample against 100 MiB x headroom 0.88 -> up to 17; max is 16.
    def peak(batch_size, amp_dtype):
        return batch_size * 5 * 2**20

    m, cmap = tiny_stage
    key = "classification" if model == "classifier" else "detection"
    cfg = make_config(tmp_path, f"train.{key}.auto_batch_tune=true", f"train.{key}.auto_batch_max=16")
    plan = tune_batch(cfg, m, cmap, model, probes=(peak, peak), device_total_bytes=100 * 2**20)
    assert (plan["batch_size"], plan["grad_accum"]) == (16, 1) and plan["probed"]
    start = getattr(cfg.train, key).batch_size
    assert plan["probes"][0] == [start, start * 5 * 2**20] and plan["eval_batch_size"] >= 16


def test_a_probed_plan_trains_at_its_batch(make_config, tmp_path, tiny_stage):
    plan = {"batch_size": 16, "grad_accum": 1, "eval_batch_size": 16, "probed": True, "device": "test probes"}
    seen = []
    result = run(make_config, tmp_path, tiny_stage, "sequential", "train.classification.epochs=1",
                 models=("classifier",), plans={"classifier": {"batch": plan}},
                 step_hook=lambda tick, loss, model: seen.append(tick))["classifier"]
    assert result.batch_size == 16 and result.global_step == len(seen) == 3
    assert result.auto_batch["applied_lr_scale"] == 2.0
    with pytest.raises(ValueError, match=r"plans for \['batch'\]: plans are keyed by the models"):
        run(make_config, tmp_path / "old", tiny_stage, "sequential", plans={"batch": plan})


def test_stage_config_returns_changes_and_logs_what_runs(make_config, tmp_path, caplog):
    cfg = make_config(tmp_path, "train.stage_overrides.stage_3.batch_size_override=16",
                      "train.stage_overrides.stage_3.num_workers_override=2")
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        staged, changes = stage_config(cfg, 3)
    assert "train.classification.batch_size: 16 (stage override)" in changes
    assert staged.train.classification.batch_size == 16 and cfg.train.classification.batch_size == 8
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 3 runs with"))
    assert "classifier batch 16" in line and "detector batch 4" in line and "2 workers" in line
    assert "channels_last=True" in line and "strategy interleaved" in line


def test_a_plan_is_keyed_by_what_its_probes_depend_on_and_nothing_else():
    from pillsnap.config import load_config, to_dict
    from pillsnap.train.tuning.plans import tuning_fingerprint

    def key(model, *overrides):
        return tuning_fingerprint(to_dict(load_config(profile="ci", overrides=list(overrides))), model, "this-box")

    for model in ("classifier", "detector"):
        base = key(model)
        assert key(model, "serve.smoke_requests=3", "train.classification.epochs=9", "logging.tensorboard=false",
                   "evaluation.checks.multi_batch_size=4") == base
        assert key(model, "optimization.channels_last=true") != base  # memory format changes the peak
        assert key(model, "train.auto_batch_vram_headroom=0.5") != base
    assert key("classifier", "classification.image_size=48") != key("classifier")
    assert key("detector", "classification.image_size=48") == key("detector")
    assert key("detector", "detection.scale=s") != key("detector")
