"""Retries resume (and are not spent on permanent errors), cached stages, cache invalidation, a person's review
through a paused flow (an override of a NO_GO, attested checks), the unattended policy, advance mode.

Most runs here switch the detector off (the sequential path, one model) to keep the suite fast; the shipped
interleaved path runs in test_stage_flow.py and test_production_path.py."""
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
    """Durations of every training task run so far, oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    runs = [r for r in runs if r.name.startswith("train-") and r.start_time and r.end_time]
    runs.sort(key=lambda r: r.start_time)
    return [(r.end_time - r.start_time).total_seconds() for r in runs]


@pytest.fixture()
def prepared(prefect_harness, classifier_only):
    data_flow(profile="ci", overrides=classifier_only)
    return classifier_only


def test_a_killed_training_task_is_retried_and_resumes(prepared):
    result = stage_flow(stage=1, profile="ci", overrides=[*prepared, "train.crash_at_step=5"])
    assert result["train_state"] == "Completed"
    assert result["resumed_from_step"] == 4  # recovery checkpoint every 2 steps; step 5 crashed once
    assert result["global_step"] > 5


def test_second_run_is_cached_and_a_missing_checkpoint_invalidates_it(prepared):
    first = stage_flow(stage=1, profile="ci", overrides=prepared)
    # A serving or reporting key is not part of the training's cache key or fingerprint.
    second = stage_flow(stage=1, profile="ci", overrides=[*prepared, "serve.smoke_requests=6",
                                                          "evaluation.checks.multi_batch_size=4"])
    assert (first["train_state"], second["train_state"]) == ("Completed", "Cached")
    assert not (Path(first["exp_dir"]) / "stage_1/checkpoints.previous").exists()
    durations = _train_task_seconds()
    assert durations[-1] < 0.2 * durations[-2], durations
    assert second["accuracy"] == first["accuracy"]
    best = Path(first["exp_dir"]) / "stage_1/checkpoints/best.pt"
    best.unlink()
    third = stage_flow(stage=1, profile="ci", overrides=prepared)
    assert third["train_state"] == "Completed" and best.is_file()
    assert third["resumed_from_step"] is None  # a finished run without best.pt starts fresh, not resumed
    assert list((best.parent.parent / "checkpoints.previous").iterdir())


def _resume_when_paused(run_input: dict, found: dict) -> None:
    deadline = time.time() + 240
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if paused:
                found["id"] = paused[0].id
                resume_flow_run(paused[0].id, run_input=run_input)
                return
            time.sleep(1)


def test_a_person_overrides_a_no_go_and_attests_the_attested_checks(prepared):
    found = {}
    answer = {"choice": "proceed", "attested": ["cloudflare_tunnel_setup"], "reviewer": "pharmacist kim"}
    thread = threading.Thread(target=_resume_when_paused, args=(answer, found), daemon=True)
    thread.start()
    result = stage_flow(stage=1, profile="ci",
                        overrides=[*prepared, "orchestration.interactive_review=true",
                                   "orchestration.review_timeout_s=240"])
    thread.join(timeout=5)
    assert "id" in found, "the flow never paused for review"
    assert (result["go_no_go"], result["choice"], result["chosen_by"]) == ("NO_GO", "proceed", "human")
    assert result["approved"] and result["override"]
    record = Ledger.of(Path(result["exp_dir"])).latest(1)
    assert record.approved and record.override and record.reviewer == "pharmacist kim"
    assert record.overridden[0] == "ACC_BELOW_TARGET" and record.reasons == ["ACC_BELOW_TARGET"]
    checks = json.loads((Path(result["exp_dir"]) / "stage_1/reports/checks.json").read_text())
    assert checks["cloudflare_tunnel_setup"]["status"] == "attested" == record.checks["cloudflare_tunnel_setup"]
    assert checks["cloudflare_tunnel_setup"]["measured"]["reviewer"] == "pharmacist kim"
    assert record.attestations["cloudflare_tunnel_setup"]["source"] == "review"
    # The detector is off in this run: its check is ruled out by the configuration and says so, never a pass.
    assert checks["detection_model_loading"]["status"] == "not_applicable"
    advice = json.loads((Path(result["exp_dir"]) / "stage_1/reports/advisor.json").read_text())
    assert advice["recommendation"] == record.recommendation  # the advisor's word after the attestations
    assert Ledger.of(Path(result["exp_dir"])).plan()["stage"] == 2  # progression honours the override
    report = (Path(result["exp_dir"]) / "stage_1/reports/stage_report.md").read_text()
    assert "**override** of: ACC_BELOW_TARGET" in report


def test_an_unattended_policy_never_overrides_a_no_go_and_attestations_ahead_count_with_a_name(prepared):
    exp_dir = Path(prepared[0].split("=", 1)[1])
    Ledger.of(exp_dir).attest(1, "cloudflare_tunnel_setup", "pharmacist kim", "tunnel checked before the night run")
    levels = ("RECOMMEND_PROCEED", "SUGGEST_OPTIMIZE", "WARN_STOP")
    result = stage_flow(stage=1, profile="ci", overrides=[
        *prepared, *(f"orchestration.unattended_policy.{lvl}=proceed" for lvl in levels)])
    assert (result["go_no_go"], result["choice"], result["chosen_by"]) == ("NO_GO", "stop", "policy")
    assert "never approves" in result["stop_reason"] and "ACC_BELOW_TARGET" in result["stop_reason"]
    assert not result["approved"] and not result["override"]
    ledger = Ledger.of(exp_dir)
    record = ledger.latest(1)
    assert record.choice == "stop" and record.stop_reason == result["stop_reason"]  # what was really decided
    assert record.checks["cloudflare_tunnel_setup"] == "attested"
    assert record.attestations["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"
    plan = ledger.plan()
    assert plan["action"] == "blocked" and "never approves" in plan["why"]
    assert ledger.pending_attestations(1) == {}  # used by this decision


def test_a_stage_without_an_approved_predecessor_refuses_before_any_work(prepared):
    from pillsnap.ledger import StageRefused

    exp_dir = Path(prepared[0].split("=", 1)[1])
    with pytest.raises(StageRefused, match="Stage 1 has no decision"):
        stage_flow(stage=2, profile="ci", overrides=prepared)
    assert not (exp_dir / "stage_2").exists() and not (exp_dir / "data/stage_2").exists()


def test_a_permanent_error_fails_the_training_task_at_once(prepared):
    from prefect import flow

    from pillsnap.config import load_config, to_dict
    from tasks.train import TRAIN_RETRIES, train_task

    config = to_dict(load_config(profile="ci", overrides=prepared))  # no stage subset built: a data error

    @flow
    def train_without_a_subset():
        state = train_task(config, 1, "no-subset", return_state=True)
        return state.is_failed(), str(state.message), state.state_details.task_run_id

    failed, message, task_run_id = train_without_a_subset()
    assert failed and "stage_1/subset.json" in message
    with get_client(sync_client=True) as client:
        run = client.read_task_run(task_run_id)
    assert run.run_count == 1 and TRAIN_RETRIES > 0  # a retry could only repeat it


def test_advance_mode_runs_the_next_stage_from_the_ledger(prepared):
    exp_dir = Path(prepared[0].split("=", 1)[1])
    Ledger.of(exp_dir).record(StageRecord(stage=1, decision="GO", choice="proceed", chosen_by="human",
                                          reviewer="pharmacist kim"))
    out = progressive_flow(mode="advance", profile="ci", overrides=prepared)
    assert [s["stage"] for s in out["steps"]] == [2]
    assert Ledger.of(exp_dir).latest(2) is not None
    Ledger.of(exp_dir).record(StageRecord(stage=2, decision="NO_GO", choice="stop"))
    blocked = progressive_flow(mode="advance", profile="ci", overrides=prepared)
    assert blocked["steps"][0]["action"] == "blocked" and "NO_GO" in blocked["steps"][0]["why"]


def test_a_deployment_run_is_suspended_for_its_review_and_resumes_from_persisted_results(prepared):
    """A worker would start the suspended run again once answered; here the same process does, with Prefect's
    engine (run_flow), as the worker's process would."""
    from prefect.exceptions import Pause
    from prefect.flow_engine import run_flow

    parameters = {"stage": 1, "profile": "ci", "overrides": [*prepared, "orchestration.interactive_review=true",
                                                             "orchestration.review_timeout_s=600"]}
    with get_client(sync_client=True) as client:
        deployment = stage_flow.to_deployment(name="suspend-test").apply()
        run = client.create_flow_run_from_deployment(deployment, parameters=parameters)
        with pytest.raises(Pause):  # the process ends here: the machine is free while a person decides
            run_flow(stage_flow, flow_run=run, parameters=parameters)
        assert client.read_flow_run(run.id).state.name == "Suspended"
        resume_flow_run(run.id, run_input={"choice": "stop", "reviewer": "pharmacist lee"})
        state = run_flow(stage_flow, flow_run=client.read_flow_run(run.id), parameters=parameters,
                         return_type="state")
        result = state.result()
        tasks = {}
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
        for task_run in sorted(runs, key=lambda r: r.created):
            tasks.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run.state.name)
    assert (result["choice"], result["chosen_by"], result["approved"]) == ("stop", "human", False)
    for name in ("train", "evaluate-stage", "export-onnx", "api-check", "stage-checks", "go-no-go"):
        assert tasks[name][-1] == "Cached", (name, tasks[name])  # the second start redid none of it
    assert Ledger.of(Path(result["exp_dir"])).latest(1).choice == "stop"
