"""Retries resume, cached stages, cache invalidation, human review through a paused flow, advance mode."""
import json
import threading
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from flows.data import data_flow
from flows.progressive import progressive_flow
from flows.stage import stage_flow
from pillsnap.ledger import Ledger, StageRecord

pytestmark = pytest.mark.integration


def _train_task_seconds(flow_run_name_contains: str = "") -> list:
    """Durations of every train-classifier task run so far, oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    runs = [r for r in runs if r.name.startswith("train-classifier") and r.start_time and r.end_time]
    runs.sort(key=lambda r: r.start_time)
    return [(r.end_time - r.start_time).total_seconds() for r in runs]


@pytest.fixture()
def prepared(prefect_harness, flow_overrides):
    data_flow(profile="ci", overrides=flow_overrides)
    return flow_overrides


def test_a_killed_training_task_is_retried_and_resumes(prepared):
    result = stage_flow(stage=1, profile="ci", overrides=[*prepared, "train.crash_at_step=5"])
    assert result["train_state"] == "Completed"
    assert result["resumed_from_step"] == 4  # recovery checkpoint every 2 steps; step 5 crashed once
    assert result["global_step"] > 5


def test_second_run_is_cached_and_a_missing_checkpoint_invalidates_it(prepared):
    first = stage_flow(stage=1, profile="ci", overrides=prepared)
    second = stage_flow(stage=1, profile="ci", overrides=prepared)
    assert (first["train_state"], second["train_state"]) == ("Completed", "Cached")
    durations = _train_task_seconds()
    assert durations[-1] < 0.2 * durations[-2], durations
    assert second["accuracy"] == first["accuracy"]
    best = Path(first["exp_dir"]) / "stage_1/checkpoints/best.pt"
    best.unlink()
    third = stage_flow(stage=1, profile="ci", overrides=prepared)
    assert third["train_state"] == "Completed" and best.is_file()
    assert third["resumed_from_step"] is None  # a finished run without best.pt starts fresh, not resumed
    assert list((best.parent.parent / "checkpoints.previous").iterdir())


def _resume_when_paused(choice: str, found: dict) -> None:
    deadline = time.time() + 240
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if paused:
                found["id"] = paused[0].id
                resume_flow_run(paused[0].id, run_input={"choice": choice, "note": "from the test"})
                return
            time.sleep(1)


def test_review_pause_is_answered_from_the_ui_and_lands_in_the_ledger(prepared):
    found = {}
    answer = threading.Thread(target=_resume_when_paused, args=("rerun_optimized", found), daemon=True)
    answer.start()
    result = stage_flow(stage=1, profile="ci",
                        overrides=[*prepared, "orchestration.interactive_review=true",
                                   "orchestration.review_timeout_s=240"])
    answer.join(timeout=5)
    assert "id" in found, "the flow never paused for review"
    assert (result["choice"], result["chosen_by"]) == ("rerun_optimized", "human")
    record = Ledger.of(Path(result["exp_dir"])).latest(1)
    assert record.choice == "rerun_optimized" and record.chosen_by == "human"
    assert record.overrides == result["overrides"]


@pytest.mark.parametrize("policy", ["proceed", "stop"])
def test_unattended_policy_is_applied(prepared, policy):
    levels = ("RECOMMEND_PROCEED", "SUGGEST_OPTIMIZE", "WARN_STOP")
    result = stage_flow(stage=1, profile="ci", overrides=[
        *prepared, *(f"orchestration.unattended_policy.{lvl}={policy}" for lvl in levels)])
    assert (result["choice"], result["chosen_by"]) == (policy, "policy")
    ledger = json.loads((Path(result["exp_dir"]) / "ledger.json").read_text())
    assert ledger["stages"][-1]["choice"] == policy


def test_advance_mode_runs_the_next_stage_from_the_ledger(prepared):
    exp_dir = Path(prepared[0].split("=", 1)[1])
    Ledger.of(exp_dir).record(StageRecord(stage=1, decision="GO", choice="proceed", chosen_by="human"))
    out = progressive_flow(mode="advance", profile="ci", overrides=prepared)
    assert [s["stage"] for s in out["steps"]] == [2]
    assert Ledger.of(exp_dir).latest(2) is not None
    Ledger.of(exp_dir).record(StageRecord(stage=2, decision="NO_GO", choice="stop"))
    blocked = progressive_flow(mode="advance", profile="ci", overrides=prepared)
    assert blocked["steps"][0]["action"] == "blocked" and "NO_GO" in blocked["steps"][0]["why"]
