"""One stage: settings → may it run (ledger: approved predecessor, sealed split) → environment check (weights,
resources, config: before any data work) → validate → subset → pixel-cache check → verify models → tune both
models → train → evaluate (and on the previous stage's val photos) → export → API check → stage checks (with the
attestations given ahead of the run) → Go/No-Go → advisor → review (a person, or the unattended policy) →
attestations → advisor again (its word after the attestations is what the ledger records) → ledger → report."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow

from flows.config import resolve
from flows.data import validate_data
from flows.hooks import notify_on_failure
from pillsnap.core import layout
from pillsnap.evaluate.detector_eval import detection_results
from pillsnap.ledger import Ledger
from tasks.common import kept_for_the_run, result_storage
from tasks.data import current_manifest_hash, subset_task
from tasks.evaluate import (advisor_task, attest_task, checks_task, combination_task, evaluate_task, go_no_go_task,
                            stage_results_task)
from tasks.export import api_check_task, export_task
from tasks.review import environment_check_task, pixel_cache_check_task, record_decision_task, report_task, review
from tasks.train import train_task
from tasks.tuning import (auto_batch_task, autotune_workers_task, plan_stage_task, stage_settings_task,
                          verify_models_task)


def _plans(config: Dict, stage: int, models: List[str], storage: Path) -> Dict[str, Dict]:
    """Auto batch (D-4), then worker autotune (Annex 2) at that batch, for every model that trains: cached tasks."""
    plans = {}
    for model in models:
        batch = auto_batch_task.with_options(result_storage=storage)(config, stage, model)
        workers = autotune_workers_task.with_options(result_storage=storage)(config, stage, model,
                                                                             batch["batch_size"])
        plans[model] = {"batch": batch, "workers": workers}
    return plans


def _train(config: Dict, plan: Dict, subset_hash: str, storage: Path) -> tuple[Dict[str, Dict], str]:
    """({model: result}, training task state name)."""
    stage, models = plan["stage"], plan["models"]
    batch_plans = _plans(config, stage, models, storage)
    # A cached result is only good while the checkpoints it points to exist.
    exp_dir = Path(config["paths"]["exp_dir"])
    missing = not all(layout.best_checkpoint(exp_dir, stage, model).is_file() for model in models)
    state = train_task.with_options(result_storage=storage, refresh_cache=missing)(
        config, stage, subset_hash, plan["warm_start"], batch_plans, return_state=True)
    return state.result(), state.name


@flow(name="pillsnap-stage", on_failure=[notify_on_failure])
def stage_flow(stage: int = 1, profile: Optional[str] = None, overrides: Optional[List[str]] = None,
               config_path: Optional[str] = None, without_approved_predecessor: str = "") -> Dict:
    """`without_approved_predecessor`: who runs this stage although the previous one is not approved, and why
    (recorded in the ledger; the regression guard is then skipped on the record)."""
    config, settings_changed = stage_settings_task(resolve(config_path, profile, overrides), stage)
    plan = plan_stage_task(config, stage, without_approved_predecessor)  # may it run: before any work
    environment_check_task(config, stage)  # weights, resources, config: before any data work
    exp_dir = Path(config["paths"]["exp_dir"])
    storage = result_storage(config)
    manifest_hash = current_manifest_hash(config)
    validation = validate_data(config, manifest_hash)  # shards on orchestration.task_runner
    subset_missing = not (layout.stage_data_dir(exp_dir, stage) / "subset.csv").is_file()
    subset = subset_task.with_options(result_storage=storage, refresh_cache=subset_missing)(
        config, stage, manifest_hash)
    pixel_cache_check_task(config, stage)  # the cache it sizes is the stage's
    verify_models_task(config, stage)
    trained, train_state = _train(config, plan, subset["subset_hash"], storage)
    train, det_train = trained["classifier"], trained.get("detector")
    baseline, predecessor = plan["baseline"], plan["predecessor"]
    kept = partial(kept_for_the_run, storage=storage)  # a run suspended for its review restarts from the top
    evaluation = kept(evaluate_task)(config, stage, train["best_checkpoint"],
                               (train.get("auto_batch") or {}).get("eval_batch_size"), baseline is not None)
    detection = detection_results(det_train, kept(combination_task)(config, stage) if det_train else None)
    export = kept(export_task)(config, stage)
    api = kept(api_check_task)(config, stage)
    given = Ledger.of(exp_dir).pending_attestations(stage)
    checks = kept(checks_task)(config, stage, subset, trained, evaluation, export, api, given)
    results = kept(stage_results_task)(stage, evaluation, trained, validation, subset, checks, detection, api)
    go_no_go = kept(go_no_go_task)(config, stage, results, baseline, predecessor)
    advice = kept(advisor_task)(config, stage, results)
    decided = review(config, stage, go_no_go, advice, given)
    checks = attest_task(config, stage, decided.attestations)
    results = stage_results_task(stage, evaluation, trained, validation, subset, checks, detection, api)
    advice = advisor_task(config, stage, results)  # after the attestations: the word the ledger records
    checkpoints = {model: result["best_checkpoint"] for model, result in trained.items()}
    decision = record_decision_task(config, stage, go_no_go, advice, decided, results, checkpoints, predecessor)
    report = report_task(config, stage, subset, train, evaluation, go_no_go, advice, detection, checks, decision)
    return {"stage": stage, "report": report, "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"], "top5": evaluation["top5"], "n_val": evaluation["n"],
            "detection": detection, "export_ok": bool(export.get("ok")), "api": api,
            "settings_changed": settings_changed, "checks": results["checks"],
            "go_no_go": go_no_go["decision"], "reasons": go_no_go["reasons"],
            "recommendation": advice["recommendation"], **decision, "exp_dir": config["paths"]["exp_dir"],
            "train_state": train_state, "global_step": train["global_step"],
            "resumed_from_step": train["resumed_from_step"], "overrides": advice.get("overrides", [])}
