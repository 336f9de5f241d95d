"""One stage: settings → check → validate → subset → verify models → tune → train → evaluate → export
→ Go/No-Go → advisor review → ledger → report."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow

from flows.config import resolve
from flows.hooks import notify_on_failure
from pillsnap.data.subsets import stage_dir as subset_dir
from pillsnap.evaluate.stage_detection import detection_results
from pillsnap.evaluate.stage_eval import assemble_stage_results
from pillsnap.ledger import Ledger
from tasks.common import result_storage
from tasks.data import current_manifest_hash, subset_task, validate_task
from tasks.evaluate import advisor_task, combination_task, evaluate_task, go_no_go_task
from tasks.export import export_task
from tasks.review import environment_check_task, record_decision_task, report_task, review
from tasks.train import classifier_checkpoint, detector_checkpoint, train_classifier_task, train_detector_task
from tasks.tuning import auto_batch_task, autotune_workers_task, stage_settings_task, verify_models_task


def _previous_stage(config: Dict, stage: int) -> tuple[Optional[str], Optional[Dict]]:
    """Warm-start checkpoint and regression baseline from the previous stage, when it was approved."""
    if stage <= 1:
        return None, None
    rec = Ledger.of(Path(config["paths"]["exp_dir"])).latest(stage - 1)
    ckpt = classifier_checkpoint(config, stage - 1)
    if rec is None or not rec.approved or not ckpt.is_file():
        return None, None
    return str(ckpt), {"accuracy": rec.metrics.get("accuracy")}


def _train(config: Dict, stage: int, subset_hash: str, storage: Path, init: Optional[str]) -> tuple[Dict, Optional[Dict], str]:
    """(classifier result, detector result or None, classifier task state name)."""
    detection_on = config["detection"]["enabled"]
    det_missing = not detector_checkpoint(config, stage).is_file()
    if detection_on and config["train"]["strategy"] == "interleaved":
        state = train_detector_task.with_options(result_storage=storage, refresh_cache=det_missing)(
            config, stage, subset_hash, return_state=True)
        det = state.result()
        cls = {**det["extra"]["classifier"], "epochs_completed": det["epochs_completed"],
               "global_step": det["global_step"], "resumed_from_step": None, "stopped_early": det["stopped_early"],
               "policy": "interleaved", "batch_size": config["train"]["classification"]["batch_size"]}
        return cls, det, state.name
    batch = auto_batch_task.with_options(result_storage=storage)(config, stage)
    workers = autotune_workers_task.with_options(result_storage=storage)(config, stage, batch["batch_size"])
    ckpt_missing = not classifier_checkpoint(config, stage).is_file()
    state = train_classifier_task.with_options(result_storage=storage, refresh_cache=ckpt_missing)(
        config, stage, subset_hash, init, batch, workers, return_state=True)
    det = None
    if detection_on:
        det = train_detector_task.with_options(result_storage=storage, refresh_cache=det_missing)(
            config, stage, subset_hash)
    return state.result(), det, state.name


@flow(name="pillsnap-stage", on_failure=[notify_on_failure])
def stage_flow(stage: int = 1, profile: Optional[str] = None, overrides: Optional[List[str]] = None,
               config_path: Optional[str] = None) -> Dict:
    config, settings_changed = stage_settings_task(resolve(config_path, profile, overrides), stage)
    storage = result_storage(config)
    environment_check_task(config, stage)
    manifest_hash = current_manifest_hash(config)
    validation = validate_task.with_options(result_storage=storage)(config, manifest_hash)
    subset_missing = not (subset_dir(Path(config["paths"]["exp_dir"]), stage) / "subset.csv").is_file()
    subset = subset_task.with_options(result_storage=storage, refresh_cache=subset_missing)(
        config, stage, manifest_hash)
    verify_models_task(config, stage)
    init_checkpoint, baseline = _previous_stage(config, stage)
    train, det_train, train_state = _train(config, stage, subset["subset_hash"], storage, init_checkpoint)
    evaluation = evaluate_task(config, stage, train["best_checkpoint"])
    detection = detection_results(det_train)
    if detection is not None:
        detection["combination"] = combination_task(config, stage)
    export = export_task(config, stage)
    results = assemble_stage_results(evaluation, train, validation, detection, export)
    go_no_go = go_no_go_task(config, stage, results, baseline)
    advice = advisor_task(config, stage, results)
    choice, chosen_by = review(config, stage, advice)
    checkpoints = {"classifier": train["best_checkpoint"],
                   **({"detector": det_train["best_checkpoint"]} if det_train else {})}
    decision = record_decision_task(config, stage, go_no_go, advice, choice, chosen_by,
                                    {k: evaluation.get(k) for k in ("accuracy", "macro_f1", "top5", "n")}, checkpoints)
    report = report_task(config, stage, subset, train, evaluation, go_no_go, advice, detection)
    return {"stage": stage, "report": report, "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"], "top5": evaluation["top5"], "n_val": evaluation["n"],
            "detection": detection, "export_ok": bool(export.get("ok")), "settings_changed": settings_changed,
            "go_no_go": go_no_go["decision"], "reasons": go_no_go["reasons"],
            "recommendation": advice["recommendation"], **decision, "exp_dir": config["paths"]["exp_dir"],
            "train_state": train_state, "global_step": train["global_step"],
            "resumed_from_step": train["resumed_from_step"], "overrides": advice.get("overrides", [])}
