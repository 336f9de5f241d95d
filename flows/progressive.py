"""Progressive training: stages in order, each only after the previous one is GO and approved.

mode="advance" (the scheduled deployment): read ledger.json and do ONE step: run the next stage, re-run it
with the advisor's overrides when that was the choice, run the final test once after an approved Stage 4,
or report what blocks progress. mode="run": run stages start..end in one go, stopping at the first that is
not approved. The experiment lock keeps two runs from training in one experiment at once.
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
            steps.append({"stage": plan["stage"], "decision": result["decision"], "choice": result["choice"]})
            if mode == "advance" or not result["approved"]:
                break
        elif plan["action"] == "final":
            steps.append({"final_test": final_test_flow(profile=profile, overrides=overrides, config_path=config_path)})
            break
        else:
            steps.append(plan)
            break
    return {"mode": mode, "steps": steps}
