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
from pillsnap.evaluate.detector_eval import detection_results
from pillsnap.ledger import Ledger
from pillsnap.data.subsets import subset_changed
from pillsnap.train.results import checkpoints_changed
from tasks.common import fresh_result, kept_for_the_run, result_storage
from tasks.data import current_manifest_hash, subset_task
from tasks.evaluate import (advisor_task, attest_task, checks_task, combination_task, evaluate_task, go_no_go_task,
                            stage_results_task)
from tasks.export import api_check_task, export_task
from tasks.review import (environment_check_task, pixel_cache_check_task, record_decision_task, report_task,
                          restore_checks_task, review, stored_judgement_task)
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
    """({model: result}, training task state name). A cached result is good while its best.pt files are the ones it
    recorded (by sha256)."""
    stage = plan["stage"]
    batch_plans = _plans(config, stage, plan["models"], storage)
    return fresh_result(train_task, checkpoints_changed, config, stage, subset_hash, plan["warm_start"], batch_plans,
                        result_storage=storage)


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
    subset, _ = fresh_result(subset_task, lambda s: subset_changed(exp_dir, stage, s["subset_hash"]), config, stage,
                             manifest_hash, result_storage=storage)
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
    judged = {"validation": validation, "subset": subset, "trained": trained, "evaluation": evaluation,
              "detection": detection, "export": export, "api": api, "checks": checks}
    results = kept(stage_results_task)(stage, *_measured(judged, checks))
    go_no_go = kept(go_no_go_task)(config, stage, results, baseline, predecessor)
    decision = decide_stage(config, stage, judged, results, go_no_go, given, predecessor)
    return {"stage": stage, "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"], "top5": evaluation["top5"], "n_val": evaluation["n"],
            "detection": detection, "export_ok": bool(export.get("ok")), "api": api,
            "settings_changed": settings_changed, **decision, "train_state": train_state,
            "global_step": train["global_step"], "resumed_from_step": train["resumed_from_step"]}


def _measured(judged: Dict, checks: Dict) -> tuple:
    """stage_results_task's arguments after the stage: what its tasks returned, with these checks."""
    return (judged["evaluation"], judged["trained"], judged["validation"], judged["subset"], checks,
            judged["detection"], judged["api"])


def decide_stage(config: Dict, stage: int, judged: Dict, results: Dict, go_no_go: Dict, given: Dict[str, Dict],
                 predecessor: str = "", rejudged: Optional[Dict] = None) -> Dict:
    """Advisor → review (a person, or the unattended policy) → attestations → advisor again (its word after the
    attestations is what the ledger records) → ledger → report. `rejudged`: {evidence, seq} of the decision whose
    stored results are judged again (a re-judgement records that decision's evidence, checked when loaded)."""
    advice = kept_for_the_run(advisor_task, result_storage(config))(config, stage, results)
    decided = review(config, stage, go_no_go, advice, given)
    checks = attest_task(config, stage, decided.attestations)
    results = stage_results_task(stage, *_measured(judged, checks))
    advice = advisor_task(config, stage, results)  # after the attestations: the word the ledger records
    decision = record_decision_task(config, stage, go_no_go, advice, decided, results, judged, predecessor, rejudged)
    report = report_task(config, stage, judged["subset"], judged["trained"]["classifier"], judged["evaluation"],
                         go_no_go, advice, judged["detection"], checks, decision)
    return {"report": report, "checks": {name: c["status"] for name, c in checks.items()},
            "go_no_go": go_no_go["decision"], "reasons": go_no_go["reasons"],
            "recommendation": advice["recommendation"], **decision, "exp_dir": config["paths"]["exp_dir"],
            "overrides": advice.get("overrides", [])}


@flow(name="pillsnap-rejudge", on_failure=[notify_on_failure])
def rejudge_flow(stage: int, profile: Optional[str] = None, overrides: Optional[List[str]] = None,
                 config_path: Optional[str] = None) -> Dict:
    """A stage's latest decision judged again from its stored results, with the attestations given since (nothing
    is trained, evaluated or measured again): with the config that decision was judged by, after checking that the
    stored results and the models it judged are the files it recorded."""
    stored = stored_judgement_task(resolve(config_path, profile, overrides), stage)
    config, j, given = stored["config"], stored["judged"], stored["given"]
    restore_checks_task(config, stage, j["checks"])
    checks = attest_task(config, stage, given)  # as the stage's own run folds in attestations given ahead
    results = stage_results_task(stage, *_measured(j, checks))
    return {"stage": stage, "rejudged_from": stored["seq"],
            **decide_stage(config, stage, {**j, "checks": checks}, results, j["go_no_go"], given,
                           stored["predecessor"], {"evidence": stored["evidence"], "seq": stored["seq"]})}
