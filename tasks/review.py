"""Environment check, human review (pause for a choice in the UI, or the unattended policy), the ledger,
and the stage report artifacts."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from pillsnap.evaluate.stage_report import render_stage_report
from pillsnap.ledger import Ledger, StageRecord
from pillsnap.notify import notify
from pillsnap.train import run_prechecks
from tasks.common import cfg_of, library_logs_in_run


class ReviewChoice(RunInput):
    choice: Literal["proceed", "rerun_optimized", "stop"]
    note: str = ""


@task(name="environment-check")
def environment_check_task(config: Dict, stage: int) -> Dict:
    """GPU, RAM, disk, the config, and whether the stage's pixel cache fits (so it runs after the subset)."""
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path
    from pillsnap.data.subsets import read_subset
    from pillsnap.train.data import stage_samples

    cfg = cfg_of(config)
    with library_logs_in_run():
        subset = read_subset(cfg.exp_dir, stage)[0]
        class_map = ClassMap.load(class_map_path(cfg))
        return run_prechecks(cfg, stage=stage, class_map_size=len(class_map),
                             cache_samples=stage_samples(cfg, subset, class_map)).to_dict()


def review(config: Dict, stage: int, advice: Dict) -> Tuple[str, str]:
    """(choice, chosen_by). Runs in the flow itself: a pause must happen at flow level, not inside a task."""
    cfg = cfg_of(config)
    logger = get_run_logger()
    if cfg.orchestration.interactive_review:
        description = (f"Stage {stage}: advisor says **{advice['recommendation']}** — {advice['message']}\n\n"
                       + "\n".join(f"- `{o['id']}`: {o['label']}" for o in advice["options"]))
        try:
            answer = pause_flow_run(
                wait_for_input=ReviewChoice.with_initial_data(description=description,
                                                              choice=advice["recommended_option"]),
                timeout=cfg.orchestration.review_timeout_s, poll_interval=2, key=f"stage-{stage}-review")
            return answer.choice, "human"
        except Exception as e:  # a timed-out pause falls back to the unattended policy
            logger.warning("review pause ended without an answer (%s); applying the unattended policy", e)
    choice = cfg.orchestration.unattended_policy.get(advice["recommendation"], "stop")
    return choice, "policy"


@task(name="record-decision")
def record_decision_task(config: Dict, stage: int, go_no_go: Dict, advice: Dict, choice: str, chosen_by: str,
                         metrics: Dict, checkpoints: Dict[str, str]) -> Dict:
    ctx = get_run_context()
    flow_run_id = str(ctx.task_run.flow_run_id) if getattr(ctx, "task_run", None) else ""
    rec = StageRecord(stage=stage, decision=go_no_go["decision"], reasons=go_no_go["reasons"],
                      recommendation=advice["recommendation"], choice=choice, chosen_by=chosen_by,
                      metrics=metrics, checkpoints=checkpoints, flow_run_id=flow_run_id,
                      overrides=advice.get("overrides", []) if choice == "rerun_optimized" else [])
    cfg = cfg_of(config)
    Ledger.of(cfg.exp_dir).record(rec)
    notify(cfg.orchestration.webhook_url, "stage_decision", {"stage": stage, "decision": rec.decision,
                                                               "choice": choice, "metrics": metrics})
    return {"decision": rec.decision, "choice": choice, "chosen_by": chosen_by, "approved": rec.approved}


@task(name="stage-report")
def report_task(config: Dict, stage: int, subset: Dict, train: Dict, evaluation: Dict, go_no_go: Dict,
                advice: Dict, detection: Optional[Dict] = None) -> str:
    cfg = cfg_of(config)
    stage_dir = cfg.exp_dir / f"stage_{stage}"
    paths = {"tensorboard logdir": train.get("tensorboard", ""), "best checkpoint": train["best_checkpoint"],
             "last checkpoint": train["last_checkpoint"], "metrics": str(stage_dir / "reports" / "metrics.json"),
             "plots": str(stage_dir / "reports"), "ledger": str(cfg.exp_dir / "ledger.json"),
             "resolved config": str(cfg.exp_dir / "config.resolved.yaml")}
    config_summary = {"classification.backbone": cfg.classification.backbone,
                      "classification.image_size": cfg.classification.image_size,
                      "train.classification": f"epochs={cfg.train.classification.epochs} "
                      f"batch={cfg.train.classification.batch_size} lr={cfg.train.classification.lr}",
                      "policy": train.get("policy", "")}
    markdown = render_stage_report(stage, subset, train, evaluation, go_no_go, advice, paths, config_summary,
                                   detection)
    out = stage_dir / "reports" / "stage_report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    create_markdown_artifact(markdown, key=f"stage-{stage}-report", description=f"Stage {stage} report")
    create_table_artifact([{k: str(c[k]) for k in ("name", "measured", "comparison", "target", "status")}
                           for c in go_no_go["checks"]], key=f"stage-{stage}-targets",
                          description=f"Stage {stage}: metrics vs targets")
    create_link_artifact(Path(out).resolve().as_uri(), link_text="stage report file", key=f"stage-{stage}-report-file")
    return str(out)
