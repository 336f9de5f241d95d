"""Progressive training: stages in order, each only after the previous one is GO and approved.

mode="advance" (the scheduled deployment): read ledger.json and do ONE step: run the next stage, re-run it
with the advisor's overrides when that was the choice, run the final test once after an approved Stage 4,
or report what blocks progress. mode="run": run stages start..end in one go, stopping at the first that is
not approved. The experiment lock keeps two runs from training in one experiment at once.

The result ends with `outcome`: one sentence (where it stopped, the decision and its reasons, what to do next)
and `gate_stopped`, true when a gate or a decision stopped the progression (the CLI exits 3 then).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow, get_run_logger

from flows.config import resolve
from flows.final_test import final_test_flow
from flows.hooks import notify_on_failure
from flows.stage import stage_flow
from pillsnap.ledger import Ledger


def _next_step(stage: int, choice: str, unattested: List[str]) -> str:
    if choice == "rerun_optimized":
        return f"run `pillsnap progress` again: it re-runs Stage {stage} with the advisor's overrides"
    if unattested:
        return (f"confirm the attested checks as a named person (`pillsnap attest --stage {stage} --check NAME "
                f"--reviewer NAME`), then re-run Stage {stage}")
    return (f"read stage_{stage}/reports/advisor.json (suggestions and failed checks), fix and re-run "
            f"`pillsnap stage --stage {stage}`, or review it yourself (orchestration.interactive_review=true): a "
            f"named person's proceed is recorded as an override")


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
        reasons = ", ".join(last.get("reasons") or []) or "no Go/No-Go reason"
        why = last.get("stop_reason") or ""
        return {"gate_stopped": True, "sentence": (
            f"Stopped at Stage {last['stage']}: Go/No-Go {last['decision']} ({reasons}), advisor "
            f"{last.get('recommendation')}, choice {last['choice']} by {last['chosen_by']}"
            f"{f' ({why})' if why else ''}. Next: "
            f"{_next_step(last['stage'], last['choice'], last.get('unattested') or [])}.")}
    if last.get("action") == "blocked":
        return {"gate_stopped": True, "sentence": f"Blocked at Stage {last['stage']}: {last['why']}. Next: "
                f"{_next_step(last['stage'], '', last.get('unattested') or [])}."}
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
        if plan["action"] == "run":
            result = stage_flow(stage=plan["stage"], profile=profile, overrides=[*(overrides or []), *plan["overrides"]],
                                config_path=config_path)
            steps.append({**{k: result.get(k) for k in ("stage", "decision", "reasons", "recommendation", "choice",
                                                        "chosen_by", "approved", "stop_reason")},
                          "unattested": [n for n, s in result["checks"].items() if s == "unattested"]})
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
