"""One stage: check → validate → subset → train → evaluate → Go/No-Go → advisor review → ledger → report."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow

from flows.config import resolve
from flows.hooks import notify_on_failure
from pillsnap.data.subsets import stage_dir as subset_dir
from pillsnap.evaluate.stage_eval import assemble_stage_results
from pillsnap.ledger import Ledger
from tasks.common import result_storage
from tasks.data import current_manifest_hash, subset_task, validate_task
from tasks.evaluate import advisor_task, evaluate_task, go_no_go_task
from tasks.review import environment_check_task, record_decision_task, report_task, review
from tasks.train import classifier_checkpoint, train_classifier_task


def _previous_stage(config: Dict, stage: int) -> tuple[Optional[str], Optional[Dict]]:
    """Warm-start checkpoint and regression baseline from the previous stage, when it was approved."""
    if stage <= 1:
        return None, None
    rec = Ledger.of(Path(config["paths"]["exp_dir"])).latest(stage - 1)
    ckpt = classifier_checkpoint(config, stage - 1)
    if rec is None or not ckpt.is_file():
        return None, None
    return str(ckpt), {"accuracy": rec.metrics.get("accuracy")}


@flow(name="pillsnap-stage", on_failure=[notify_on_failure])
def stage_flow(stage: int = 1, profile: Optional[str] = None, overrides: Optional[List[str]] = None,
               config_path: Optional[str] = None) -> Dict:
    config = resolve(config_path, profile, overrides)
    storage = result_storage(config)
    environment_check_task(config, stage)
    manifest_hash = current_manifest_hash(config)
    validation = validate_task.with_options(result_storage=storage)(config, manifest_hash)
    subset_missing = not (subset_dir(Path(config["paths"]["exp_dir"]), stage) / "subset.csv").is_file()
    subset = subset_task.with_options(result_storage=storage, refresh_cache=subset_missing)(
        config, stage, manifest_hash)
    init_checkpoint, baseline = _previous_stage(config, stage)
    checkpoint_missing = not classifier_checkpoint(config, stage).is_file()
    train_state = train_classifier_task.with_options(result_storage=storage, refresh_cache=checkpoint_missing)(
        config, stage, subset["subset_hash"], init_checkpoint, return_state=True)
    train = train_state.result()
    evaluation = evaluate_task(config, stage, train["best_checkpoint"])
    results = assemble_stage_results(evaluation, train, validation)
    go_no_go = go_no_go_task(config, stage, results, baseline)
    advice = advisor_task(config, stage, results)
    choice, chosen_by = review(config, stage, advice)
    decision = record_decision_task(config, stage, go_no_go, advice, choice, chosen_by,
                                    {k: evaluation.get(k) for k in ("accuracy", "macro_f1", "top5", "n")},
                                    {"classifier": train["best_checkpoint"]})
    report = report_task(config, stage, subset, train, evaluation, go_no_go, advice)
    return {"stage": stage, "report": report, "accuracy": evaluation["accuracy"],
            "macro_f1": evaluation["macro_f1"], "top5": evaluation["top5"], "n_val": evaluation["n"],
            "go_no_go": go_no_go["decision"], "reasons": go_no_go["reasons"],
            "recommendation": advice["recommendation"], **decision, "exp_dir": config["paths"]["exp_dir"],
            "train_state": train_state.name, "global_step": train["global_step"],
            "resumed_from_step": train["resumed_from_step"], "overrides": advice.get("overrides", [])}
