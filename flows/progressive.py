"""Progressive training: stages in order, each only after the previous one is GO and approved.

mode="advance" (the scheduled deployment): read ledger.json and do ONE step: run the next stage, re-run it
with the advisor's overrides when that was the choice, judge its stored results again when the only thing that
stopped it was a mandatory check named persons have attested since, run the final test once after an approved
Stage 4, or report what blocks progress. mode="run": run stages start..end in one go, stopping at the first that is
not approved. The experiment lock keeps two runs from training in one experiment at once.

The result ends with `outcome`: one sentence (where it stopped, the Go/No-Go rows and mandatory checks that stopped
it, and the command that unblocks it) and `gate_stopped`, true when a gate or a decision stopped the progression
(the CLI exits 3 then).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow, get_run_logger

from flows.config import resolve
from flows.final_test import final_test_flow
from flows.hooks import notify_on_failure
from flows.stage import rejudge_flow, stage_flow
from pillsnap.ledger import Ledger, unattested_blockers


def _next_step(stage: int, choice: str, blocked_by: Dict, waiting: List[str], pending: List[str]) -> str:
    """What unblocks the stage, from what really stopped it (its failed Go/No-Go rows and mandatory checks)."""
    if choice == "rerun_optimized":
        return f"run `pillsnap progress` again: it re-runs Stage {stage} with the advisor's overrides"
    unconfirmed = [n for n in waiting if n not in pending]
    if waiting and unconfirmed:
        return (f"a named person confirms {', '.join(unconfirmed)} (`pillsnap attest --stage {stage} --check NAME "
                f"--reviewer NAME --note TEXT`), then `pillsnap progress` judges the stored results again (nothing "
                f"is retrained)")
    rows, failed = blocked_by.get("gate_rows") or [], blocked_by.get("mandatory") or {}
    fix = [*(f"Go/No-Go {r}" for r in rows), *(f"mandatory check {n} {st}" for n, st in failed.items())]
    what = f"fix {'; '.join(fix)}" if fix else "read the advisor's suggestions"
    return (f"{what} (stage_{stage}/reports/advisor.json and stage_report.md) and run `pillsnap stage --stage "
            f"{stage}` again, or a named person approves it over them in the review "
            f"(orchestration.interactive_review=true), recorded as an override")


def _stopped(stage: int, decision: str, reasons: List[str], why: str) -> str:
    return f"Stopped at Stage {stage}: Go/No-Go {decision} ({', '.join(reasons) or 'no Go/No-Go reason'}){why}"


def outcome(steps: List[Dict]) -> Dict:
    """One sentence on how the progression ended, and whether a gate stopped it."""
    last = steps[-1] if steps else {}
    if "final_test" in last:
        final = last["final_test"]
        return {"gate_stopped": False, "sentence": f"Stages approved through Stage 4; final test run "
                f"{final.get('sealed_split_evaluations')}: {final.get('recommendation')}."}
    if "stage" in last and "decision" in last:
        if last["approved"]:
            return {"gate_stopped": False, "sentence": f"Stage {last['stage']} approved ({last['decision']}, "
                    f"{last['choice']} by {last['chosen_by']}); the next run advances to the next step."}
        stop = f" ({last['stop_reason']})" if last.get("stop_reason") else ""
        why = f", advisor {last.get('recommendation')}, choice {last['choice']} by {last['chosen_by']}{stop}"
        next_step = _next_step(last["stage"], last["choice"], last.get("blocked_by") or {},
                               unattested_blockers(last["decision"], last["chosen_by"], last.get("blocked_by")), [])
        return {"gate_stopped": True, "sentence": f"{_stopped(last['stage'], last['decision'], last['reasons'], why)}"
                f". Next: {next_step}."}
    if last.get("action") == "blocked":
        next_step = _next_step(last["stage"], "", last.get("blocked_by") or {}, last.get("unattested") or [],
                               last.get("pending") or [])
        return {"gate_stopped": True,
                "sentence": f"Blocked at Stage {last['stage']}: {last['why']}. Next: {next_step}."}
    return {"gate_stopped": False, "sentence": f"Nothing to do: {last.get('why', 'the final test has run')}."}


def _plan(profile, overrides, config_path, start: int, end: int) -> Dict:
    exp_dir = Path(resolve(config_path, profile, overrides)["paths"]["exp_dir"])
    return Ledger.of(exp_dir).plan(start, end)


@flow(name="pillsnap-progressive", on_failure=[notify_on_failure])
def progressive_flow(start_stage: int = 1, end_stage: int = 4, mode: str = "advance",
                     profile: Optional[str] = None, overrides: Optional[List[str]] = None,
                     config_path: Optional[str] = None) -> Dict:
    if mode not in ("advance", "run"):
        raise ValueError(f"mode={mode!r}: use 'advance' (one step per scheduled run) or 'run'")
    logger = get_run_logger()
    steps = []
    while True:
        plan = _plan(profile, overrides, config_path, start_stage, end_stage)
        logger.info("progressive plan: %s", plan)
        if plan["action"] in ("run", "rejudge"):
            if plan["action"] == "run":
                result = stage_flow(stage=plan["stage"], profile=profile, config_path=config_path,
                                    overrides=[*(overrides or []), *plan["overrides"]])
            else:  # every check that stopped it is attested now: its stored results are judged again
                result = rejudge_flow(stage=plan["stage"], profile=profile, overrides=overrides,
                                      config_path=config_path)
            steps.append({k: result.get(k) for k in ("stage", "decision", "reasons", "recommendation", "choice",
                                                     "chosen_by", "approved", "stop_reason", "blocked_by",
                                                     "rejudged_from")})
            if mode == "advance" or not result["approved"]:
                break
        elif plan["action"] == "final":
            steps.append({"final_test": final_test_flow(profile=profile, overrides=overrides, config_path=config_path)})
            break
        else:
            steps.append(plan)
            break
    result = {"mode": mode, "steps": steps, "outcome": outcome(steps)}
    logger.info("progression: %s", result["outcome"]["sentence"])
    return result
