"""Environment check, human review (a choice in the UI, or the unattended policy), the ledger, and the stage
report artifacts.

A review can take hours. A local run waits for it in its process (pause_flow_run). A run started from a deployment
is suspended instead (suspend_flow_run): its process exits, so the GPU machine is released, and when the answer
comes the run is started again from the top; every task before the review returns the result it persisted for this
flow run (tasks.common.kept_for_the_run), and the review returns the answer."""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Literal, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput
from pydantic import Field

from pillsnap.config import describe_gate, gates_record, save_resolved, to_dict
from pillsnap.core import layout
from pillsnap.evaluate.checks.evidence import restore_checks
from pillsnap.evaluate.provenance import judged_evidence, stored_judgement
from pillsnap.evaluate.results import StageResults, decision_metrics
from pillsnap.evaluate.stage_report import embedded, linked, render_stage_report
from pillsnap.ledger import Ledger, decide, now
from pillsnap.notify import notify
from pillsnap.train import run_preflight
from tasks.common import cfg_of, library_logs_in_run, review_pause_key, run_name


class ReviewChoice(RunInput):
    choice: Literal["proceed", "rerun_optimized", "stop"]
    attested: List[str] = []  # the attested checks this person confirms (evaluation.checks.attested)
    # Who decides is a person: the server refuses an answer without a name (the run stays paused), in the UI too.
    reviewer: str = Field(min_length=1, pattern=r"^\s*\S", description="your name: a decision needs a person")
    note: str = ""


@dataclass(frozen=True)
class Review:
    choice: str
    chosen_by: str  # human | policy
    reviewer: str = ""
    attestations: Dict[str, Dict] = field(default_factory=dict)  # check -> {confirmed, reviewer, at, source}


@task(name="environment-check")
def environment_check_task(config: Dict, stage: int) -> Dict:
    """Before any data work: pretrained weights, GPU, RAM, disk and the config."""
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path

    cfg = cfg_of(config)
    with library_logs_in_run():
        path = class_map_path(cfg)
        return run_preflight(cfg, stage=stage,
                             class_map_size=len(ClassMap.load(path)) if path.is_file() else None).to_dict()


@task(name="pixel-cache-check")
def pixel_cache_check_task(config: Dict, stage: int) -> Dict:
    """Whether the stage's pixel cache and detector store fit on their disk (needs the stage's subset)."""
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path
    from pillsnap.data.subsets import read_subset
    from pillsnap.train.data import stage_samples
    from pillsnap.train.preflight import PreflightError, PreflightReport, check_stage_stores

    cfg = cfg_of(config)
    with library_logs_in_run():
        subset = read_subset(cfg.exp_dir, stage)[0]
        report = PreflightReport(check_stage_stores(cfg, subset, stage,
                                                    stage_samples(cfg, subset, ClassMap.load(class_map_path(cfg)))))
        if not report.ok:
            raise PreflightError(report)
        return report.to_dict()


def _review_text(stage: int, go_no_go: Dict, advice: Dict, attested: List[str]) -> str:
    lines = [f"Stage {stage}: Go/No-Go **{go_no_go['decision']}**"
             + (f" ({', '.join(go_no_go['reasons'])})" if go_no_go["reasons"] else ""),
             f"advisor **{advice['recommendation']}** — {advice['message']}", ""]
    lines += [f"- `{o['id']}`: {o['label']}" for o in advice["options"]]
    if go_no_go["decision"] != "GO" or advice["recommendation"] == "WARN_STOP":
        lines += ["", "Choosing `proceed` approves the stage as YOUR override; the ledger records it."]
    if attested:
        lines += ["", "Confirm in `attested` what you have checked yourself (this pipeline cannot see it): "
                  + ", ".join(f"`{n}`" for n in attested)]
    return "\n".join(lines)


def from_deployment() -> bool:
    run = FlowRunContext.get()
    return bool(run and run.flow_run and run.flow_run.deployment_id)


def _ask(question, timeout_s: int, key: str) -> ReviewChoice:
    """The reviewer's answer. Suspending exits this process (a BaseException, so nothing below catches it); an
    unanswered suspended run fails after `timeout_s` on the server, as no process is left to apply the policy."""
    if from_deployment():
        return suspend_flow_run(wait_for_input=question, timeout=timeout_s, key=key)
    return pause_flow_run(wait_for_input=question, timeout=timeout_s, poll_interval=2, key=key)


def review(config: Dict, stage: int, go_no_go: Dict, advice: Dict, given: Dict[str, Dict]) -> Review:
    """Runs in the flow itself: a pause must happen at flow level, not inside a task.

    `given`: attestations recorded ahead of the run (`pillsnap attest`). A reviewer's confirmations are added with
    their name; without a name they do not count. The policy's choice is only a wish: `decide` records what was
    really decided."""
    cfg = cfg_of(config)
    logger = get_run_logger()
    attested = list(cfg.evaluation.checks.attested)
    if cfg.orchestration.interactive_review:
        try:
            answer = _ask(ReviewChoice.with_initial_data(
                description=_review_text(stage, go_no_go, advice, attested), choice=advice["recommended_option"]),
                cfg.orchestration.review_timeout_s, review_pause_key(stage))
            unknown = sorted(set(answer.attested) - set(attested))
            if unknown:
                logger.warning("review: %s are not attested checks (evaluation.checks.attested); ignored", unknown)
            reviewer = answer.reviewer.strip()
            confirmed = [n for n in attested if n in answer.attested]
            if confirmed and not reviewer:
                logger.warning("review: %s confirmed without a reviewer name: an attestation needs a person's name; "
                               "not counted", confirmed)
            mine = {n: {"confirmed": True, "reviewer": reviewer, "at": now(), "source": "review"}
                    for n in confirmed if reviewer}
            return Review(answer.choice, "human", reviewer, {**given, **mine})
        except Exception as e:  # a timed-out pause falls back to the unattended policy
            logger.warning("review pause ended without an answer (%s); applying the unattended policy", e)
    return Review(cfg.orchestration.unattended_policy.get(advice["recommendation"], "stop"), "policy", "", dict(given))


@task(name="record-decision")
def record_decision_task(config: Dict, stage: int, go_no_go: Dict, advice: Dict, decided: Review, results: Dict,
                         judged: Dict, predecessor: str = "", rejudged: Optional[Dict] = None) -> Dict:
    """`advice` is the advisor's word after the attestations; the ledger records what was really decided, with the
    stage's figures and check statuses from its typed results, what it judged by content (the chain from the
    subset to the served model is checked first: a changed link stops the decision) and the gates it applied.
    `judged`: what the stage's tasks returned (validation, subset, trained, evaluation, detection, export, api,
    checks). `rejudged`: {evidence, seq} of the decision whose stored results were judged again."""
    cfg = cfg_of(config)
    if rejudged is not None:
        return record(cfg, stage, go_no_go, advice, decided, results, rejudged["evidence"], predecessor,
                      rejudged["seq"])
    config_file = save_resolved(cfg, run_name())  # the config this stage ran with, kept under this run's id
    with library_logs_in_run():
        evidence = judged_evidence(cfg, stage, str(config_file), {**judged, "results": results, "go_no_go": go_no_go})
    return record(cfg, stage, go_no_go, advice, decided, results, evidence, predecessor)


@task(name="stored-judgement")
def stored_judgement_task(config: Dict, stage: int) -> Dict:
    """The stage's latest decision as it can be judged again, with the attestations it counted and those given
    since; refuses files that are not the ones it recorded."""
    exp_dir = cfg_of(config).exp_dir
    with library_logs_in_run():
        stored = stored_judgement(exp_dir, stage)
    rec = stored["record"]
    return {"config": to_dict(stored["config"]), "judged": stored["judged"], "evidence": rec.evidence,
            "seq": rec.seq, "predecessor": rec.predecessor,
            "given": {**rec.attestations, **Ledger.of(exp_dir).pending_attestations(stage)}}


@task(name="restore-checks")
def restore_checks_task(config: Dict, stage: int, checks: Dict) -> Dict:
    return restore_checks(cfg_of(config), stage, checks)


def record(cfg, stage: int, go_no_go: Dict, advice: Dict, decided: Review, results: Dict, evidence: Dict,
           predecessor: str = "", rejudged_from: int = 0) -> Dict:
    """The ledger entry of a decision (in its run, or re-judged from stored results), the log and the webhook."""
    measured = StageResults.from_dict(results)
    checks = {name: status.value for name, status in measured.checks.items()}
    rec = decide(stage, go_no_go, advice, decided.choice, decided.chosen_by, decided.reviewer, checks=checks,
                 attestations=decided.attestations, metrics=decision_metrics(measured),
                 checkpoints={m: v["checkpoint"] for m, v in evidence["models"].items()}, evidence=evidence,
                 gates=gates_record(cfg, stage), flow_run_id=run_name(), predecessor=predecessor,
                 rejudged_from=rejudged_from)
    Ledger.of(cfg.exp_dir).record(rec)
    logger = get_run_logger()
    if rec.override:
        logger.warning("stage %d approved by %s's override of: %s", stage, rec.reviewer, "; ".join(rec.overridden))
    elif rec.stop_reason:
        logger.warning("stage %d stopped (%s by %s): %s", stage, rec.choice, rec.chosen_by, rec.stop_reason)
    if rec.gates_loosened:
        logger.warning("stage %d was judged by gates looser than the shipped config's: %s", stage,
                       "; ".join(describe_gate(d) for d in rec.gates_loosened))
    notify(cfg.orchestration.webhook_url, "stage_decision", {"stage": stage, "decision": rec.decision,
                                                               "choice": rec.choice, "override": rec.override,
                                                               "metrics": rec.metrics})
    return {"decision": rec.decision, "choice": rec.choice, "chosen_by": rec.chosen_by, "approved": rec.approved,
            "override": rec.override, "overridden": rec.overridden, "stop_reason": rec.stop_reason,
            "reviewer": rec.reviewer, "reasons": rec.reasons, "recommendation": rec.recommendation,
            "gates_loosened": rec.gates_loosened, "blocked_by": rec.blocked_by, "seq": rec.seq,
            "models": {m: v.get("sha256") for m, v in evidence["models"].items()}}


@task(name="stage-report")
def report_task(config: Dict, stage: int, subset: Dict, train: Dict, evaluation: Dict, go_no_go: Dict,
                advice: Dict, detection: Optional[Dict], checks: Dict, decision: Dict) -> str:
    cfg = cfg_of(config)
    reports = layout.reports_dir(cfg.exp_dir, stage)
    paths = {"tensorboard logdir": train.get("tensorboard", ""), "best checkpoint": train["best_checkpoint"],
             "last checkpoint": train["last_checkpoint"], "metrics": str(reports / "metrics.json"),
             "checks": str(reports / "checks.json"), "go/no-go": str(reports / "go_no_go.json"),
             "advisor": str(reports / "advisor.json"), "plots": str(reports),
             "ledger": str(layout.ledger(cfg.exp_dir)), "resolved config": str(layout.resolved_config(cfg.exp_dir))}
    config_summary = {"classification.backbone": cfg.classification.backbone,
                      "classification.image_size": cfg.classification.image_size,
                      "train.classification": f"epochs={cfg.train.classification.epochs} "
                      f"batch={cfg.train.classification.batch_size} lr={cfg.train.classification.lr}",
                      "train.strategy": cfg.train.strategy, "policy": train.get("policy", "")}
    render = partial(render_stage_report, stage, subset, train, evaluation, go_no_go, advice, paths, config_summary,
                     detection, checks, decision)
    out = reports / "stage_report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(picture=linked(reports)))
    create_markdown_artifact(render(picture=embedded()), key=f"stage-{stage}-report",
                             description=f"Stage {stage} report")
    create_table_artifact([{k: str(c[k]) for k in ("name", "measured", "comparison", "target", "status")}
                           for c in go_no_go["rows"]], key=f"stage-{stage}-targets",
                          description=f"Stage {stage}: metrics vs targets")
    create_link_artifact(Path(out).resolve().as_uri(), link_text="stage report file", key=f"stage-{stage}-report-file")
    return str(out)
