"""Auto batch (D-4) and worker autotune (Annex 2) in the trainer and as library calls; stage settings (D-13)."""
import json
import logging

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pillsnap.train.autobatch import CPU_REASON
from pillsnap.train.loop import ClassifierTrainer
from pillsnap.train.tuning import DISABLED_REASON, stage_config, tune_batch, tune_workers
from pillsnap.train.tuning_probes import batch_plan_from_search, worker_candidates
from pillsnap.train.workers import available_cores

ONE_STEP = ("train.deterministic=true", "train.classification.epochs=1", "train.max_steps_per_epoch=1")


def _trainer(make_config, tmp_path, tiny_stage, *overrides, **kwargs):
    m, cmap = tiny_stage
    cfg = make_config(tmp_path, *ONE_STEP, *overrides)
    labels = cmap.restrict(m.loc[m.kind == "single", "k_code"])
    return ClassifierTrainer(cfg, m, labels, tmp_path / "run", show_progress=False, **kwargs)


def _tb_scalars(tb_dir):
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_worker_autotune_measures_the_real_loader_and_logs_the_choice(make_config, tmp_path, tiny_stage):
    t = _trainer(make_config, tmp_path, tiny_stage, "dataloader.autotune_workers=true",
                 "dataloader.autotune_candidates=[1,2,16]", "dataloader.persistent_workers=false")
    result = t.run()
    plan = result.num_workers
    usable = [c for c in plan["candidates"] if c <= available_cores()]
    assert plan["num_workers"] in usable and t.num_workers == plan["num_workers"]
    assert set(plan["data_time_ms"]) == {str(c) for c in usable} and 16 in plan["skipped"]
    assert all(plan["measured_steps"][str(c)] >= 1 for c in usable)
    assert _tb_scalars(tmp_path / "run/tb")["perf/num_workers"] == [float(plan["num_workers"])]
    json.dumps(plan)


def test_worker_candidates_grow_only_on_small_machines():
    assert worker_candidates([4, 8, 12, 16], cores=2) == [1, 2, 4, 8, 12, 16]  # 4..16 are then skipped
    assert worker_candidates([4, 8, 12, 16], cores=16) == [4, 8, 12, 16]


def test_auto_batch_on_cpu_keeps_the_configured_batch_and_says_why_once(make_config, tmp_path, tiny_stage, caplog):
    t = _trainer(make_config, tmp_path, tiny_stage, "train.classification.auto_batch_tune=true")
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        result = t.run()
    plan = result.auto_batch
    assert (plan["batch_size"], plan["grad_accum"], plan["eval_batch_size"]) == (8, 1, 8)
    assert plan["reasons"] == [CPU_REASON] and plan["probed"] is False and plan["applied_lr_scale"] == 1.0
    assert result.batch_size == 8 and t.optimizer.param_groups[0]["initial_lr"] == 0.003
    assert len([r for r in caplog.records if CPU_REASON in r.getMessage()]) == 1
    assert _tb_scalars(tmp_path / "run/tb")["perf/auto_batch_found"] == [8.0]


def test_library_calls_return_small_serialisable_plans(make_config, tmp_path, tiny_stage):
    m, cmap = tiny_stage
    assert tune_batch(make_config(tmp_path), m, cmap)["reasons"] == [DISABLED_REASON]  # ci: auto batch off
    cfg = make_config(tmp_path, "dataloader.autotune_candidates=[0,1]", "train.classification.auto_batch_tune=true")
    batch = tune_batch(cfg, m, cmap)
    assert batch["batch_size"] == 8 and batch["device"] == "cpu" and CPU_REASON in batch["reasons"]
    workers = tune_workers(cfg, m, cmap, batch_size=batch["batch_size"])
    assert workers["num_workers"] in workers["candidates"] and workers["batch_size"] == 8
    assert json.loads(json.dumps({"batch": batch, "workers": workers})) == {"batch": batch, "workers": workers}


def test_a_given_batch_plan_is_applied_with_linear_lr_scaling(make_config, tmp_path, tiny_stage):
    plan = {"batch_size": 4, "grad_accum": 4, "eval_batch_size": 12, "amp_dtype": "fp32", "reasons": ["test"]}
    t = _trainer(make_config, tmp_path, tiny_stage, batch_plan=plan)
    result = t.run()
    assert (result.batch_size, result.grad_accum, t.eval_batch_size) == (4, 4, 12)
    assert result.auto_batch["applied_lr_scale"] == 2.0  # global batch 16 vs the configured 8
    assert t.scheduler.base_lrs == [0.006] and t.state.epoch_positions == 16
    assert (t.oom.state.batch_size, t.oom.state.grad_accum) == (4, 4)


def test_stage_config_returns_changes_and_logs_what_runs(make_config, tmp_path, caplog):
    cfg = make_config(tmp_path, "train.stage_overrides.stage_3.batch_size_override=16",
                      "train.stage_overrides.stage_3.num_workers_override=2")
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        staged, changes = stage_config(cfg, 3)
    assert "train.classification.batch_size: 16 (stage override)" in changes
    assert staged.train.classification.batch_size == 16 and cfg.train.classification.batch_size == 8
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 3 runs with"))
    assert "classifier batch 16" in line and "2 workers" in line and "channels_last=True" in line


def test_a_probed_batch_rebuilds_the_loaders_and_trains_at_it(make_config, tmp_path, tiny_stage):
    # Fake probes stand in for CUDA: 5 MiB per sample against 100 MiB x headroom 0.88 -> up to 17; max is 16.
    def peak(batch_size, amp_dtype):
        return batch_size * 5 * 2**20

    t = _trainer(make_config, tmp_path, tiny_stage, "train.classification.auto_batch_max=16")
    plan = batch_plan_from_search(t, probes=(peak, peak), device_total_bytes=100 * 2**20)
    assert (plan["batch_size"], plan["grad_accum"], plan["eval_batch_size"]) == (16, 1, 16) and plan["probed"]
    assert plan["probes"][:2] == [[8, 8 * 5 * 2**20], [16, 16 * 5 * 2**20]]
    t.batch_plan = plan
    seen = []
    t.step_hook = lambda step: seen.append(t._loaders[True].batch_size)
    result = t.run()
    assert seen == [16] and result.batch_size == 16 and t._loaders[False].batch_size == 16
    assert result.auto_batch["applied_lr_scale"] == 2.0 and t.optimizer.param_groups[0]["initial_lr"] == 0.006
    assert _tb_scalars(tmp_path / "run/tb")["perf/auto_batch_found"] == [16.0]
