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


def _resume_when_paused(answers: list, found: dict) -> None:
    """Answer the first paused run with each of `answers` in turn; an answer the server refuses is kept in
    found["refused"] and the run stays paused for the next one."""
    deadline = time.time() + 240
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if paused:
                found["id"] = paused[0].id
                for answer in answers:
                    try:
                        resume_flow_run(paused[0].id, run_input=answer)
                        return
                    except RuntimeError as e:
                        found.setdefault("refused", []).append(str(e))
                return
            time.sleep(1)


def test_a_person_overrides_a_no_go_and_attests_the_attested_checks(prepared):
    found = {}
    anonymous = {"choice": "proceed", "attested": ["cloudflare_tunnel_setup"], "reviewer": "  "}
    answer = {"choice": "proceed", "attested": ["cloudflare_tunnel_setup"], "reviewer": "pharmacist kim"}
    thread = threading.Thread(target=_resume_when_paused, args=([anonymous, answer], found), daemon=True)
    thread.start()
    result = stage_flow(stage=1, profile="ci",
                        overrides=[*prepared, "orchestration.interactive_review=true",
                                   "orchestration.review_timeout_s=240"])
    thread.join(timeout=5)
    assert "id" in found, "the flow never paused for review"
    # Issue 28, reproduction 4: a proceed with a blank reviewer approved a NO_GO; the server now refuses the answer
    # (the UI's form says why) and the run waits for a named person.
    assert len(found["refused"]) == 1 and "reviewer" in found["refused"][0]
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


def _decision_matches_disk(exp: Path, stage: int = 1) -> dict:
    """The latest decision's figures, checked against the files it names: the model it judged (pinned, by sha256)
    is the one evaluated, and the subset on disk is the one it trained on."""
    from pillsnap.core.identity import file_sha256
    from pillsnap.data.subsets import read_subset

    rec = Ledger.of(exp).latest(stage)
    model = rec.evidence["models"]["classifier"]
    evaluation = json.loads((exp / f"stage_{stage}/reports/classification_eval.json").read_text())
    assert file_sha256(model["checkpoint"]) == model["sha256"] == evaluation["checkpoint_sha256"]
    rows, summary = read_subset(exp, stage)
    assert rec.evidence["data"]["subset"] == summary.subset_hash and evaluation["val_hash"] == summary.val_hash
    judged = json.loads(Path(rec.evidence["judged"]["file"]).read_text())
    trained = judged["trained"]["classifier"]
    assert trained["best_sha256"] == model["sha256"] and trained["data_identity"]["subset"] == summary.subset_hash
    report = (exp / f"stage_{stage}/reports/stage_report.md").read_text()
    assert f"train {summary.train_single} single" in report and f"training: {trained['epochs_completed']} epochs" in \
        report
    return {"train": summary.train_single, "epochs": trained["epochs_completed"], "model": model["sha256"]}


def test_a_changed_subset_retrains_and_every_decision_describes_the_model_it_judged(prepared):
    """Issue 28, reproduction 1: run A; run B with 24 photos "resumed" A's finished run and trained nothing; run C
    (1 epoch) took A's cached subset summary but trained on B's subset.csv; A again took its cached training result
    while best.pt was C's model. Each step's output is now bound to its inputs' content: every run trains what it
    says, and its decision's figures describe the model it judged (checked by hash)."""
    exp = Path(prepared[0].split("=", 1)[1])
    a = stage_flow(stage=1, profile="ci", overrides=prepared)
    first = _decision_matches_disk(exp)
    b = stage_flow(stage=1, profile="ci", overrides=[*prepared, "data.stages.1.images=24"])
    assert b["train_state"] == "Completed" and b["resumed_from_step"] is None and b["global_step"] > 0
    assert _decision_matches_disk(exp)["train"] == 24 != first["train"]
    c = stage_flow(stage=1, profile="ci", overrides=[*prepared, "train.classification.epochs=1"])
    assert c["train_state"] == "Completed"
    assert {k: v for k, v in _decision_matches_disk(exp).items() if k != "model"} == {"train": first["train"],
                                                                                      "epochs": 1}
    again = stage_flow(stage=1, profile="ci", overrides=prepared)  # A's cached result: its best.pt is C's now
    assert again["train_state"] == "Completed" and a["train_state"] == "Completed"
    assert {k: v for k, v in _decision_matches_disk(exp).items() if k != "model"} == {"train": first["train"],
                                                                                      "epochs": 2}
    assert len({r.evidence["models"]["classifier"]["sha256"] for r in Ledger.of(exp).records}) >= 3
    for rec in Ledger.of(exp).records:  # every decision's model is still on disk, by content
        assert Path(rec.evidence["models"]["classifier"]["checkpoint"]).is_file()


def test_a_review_whose_model_was_retrained_meanwhile_decides_nothing(prepared):
    """The review of a deployment run can take hours with no lock held: another run retrained the stage
    meanwhile. The answer then approves nothing: the resumed run names what changed."""
    from prefect.exceptions import Pause
    from prefect.flow_engine import run_flow

    exp = Path(prepared[0].split("=", 1)[1])
    parameters = {"stage": 1, "profile": "ci", "overrides": [*prepared, "orchestration.interactive_review=true",
                                                             "orchestration.review_timeout_s=600"]}
    with get_client(sync_client=True) as client:
        deployment = stage_flow.to_deployment(name="retrained-meanwhile").apply()
        run = client.create_flow_run_from_deployment(deployment, parameters=parameters)
        with pytest.raises(Pause):
            run_flow(stage_flow, flow_run=run, parameters=parameters)
        other = stage_flow(stage=1, profile="ci", overrides=[*prepared, "train.classification.epochs=1"])
        resume_flow_run(run.id, run_input={"choice": "proceed", "reviewer": "pharmacist lee"})
        state = run_flow(stage_flow, flow_run=client.read_flow_run(run.id), parameters=parameters,
                         return_type="state")
    assert state.is_failed() and "while this run waited for its review" in state.message
    assert "best.pt is not the model this result describes" in state.message
    records = Ledger.of(exp).records
    assert [r.reviewer for r in records] == [""] and records[-1].seq == other["seq"]  # only the other run decided


def test_an_attestation_given_after_the_decision_lets_progress_judge_the_stored_results_again(prepared):
    """Issue 28, reproduction 7: after attesting at Stage 4, `pillsnap progress` stayed "Blocked … confirm the
    attested checks" until the stage was run again by hand. The stored results are judged again instead: the same
    models and figures (checked by hash), the attestation counted, nothing trained."""
    exp = Path(prepared[0].split("=", 1)[1])
    # Stage 4's situation at Stage 1: a GO whose only missing piece is a check a person must attest.
    overrides = [*prepared, "data.stages.1.min_accuracy=0.0", "evaluation.recommendation.proceed_min_score=0.0",
                 "evaluation.recommendation.optimize_min_score=0.0", "evaluation.stages.1.mandatory_checks=["
                 "pipeline_complete,classification_model_loading,onnx_conversion_success,cloudflare_tunnel_setup]"]
    first = progressive_flow(mode="advance", profile="ci", overrides=overrides)
    step = first["steps"][0]
    assert (step["decision"], step["choice"], step["approved"]) == ("GO", "stop", False)
    assert step["blocked_by"] == {"gate_rows": [], "mandatory": {"cloudflare_tunnel_setup": "unattested"}}
    assert "Next: a named person confirms cloudflare_tunnel_setup" in first["outcome"]["sentence"]
    judged = Ledger.of(exp).latest(1)
    Ledger.of(exp).attest(1, "cloudflare_tunnel_setup", "pharmacist kim", "tunnel checked after the run")
    trained_before = len(_train_task_seconds())
    second = progressive_flow(mode="advance", profile="ci", overrides=overrides)
    step = second["steps"][0]
    assert (step["decision"], step["choice"], step["approved"], step["rejudged_from"]) == ("GO", "proceed", True,
                                                                                          judged.seq)
    assert len(_train_task_seconds()) == trained_before  # nothing was trained (or evaluated) again
    rec = Ledger.of(exp).latest(1)
    assert rec.rejudged_from == judged.seq and rec.evidence == judged.evidence and rec.metrics == judged.metrics
    assert rec.attestations["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"
    checks = json.loads((exp / "stage_1/reports/checks.json").read_text())
    assert checks["cloudflare_tunnel_setup"]["status"] == "attested" == rec.checks["cloudflare_tunnel_setup"]
    assert "Stage 1 approved" in second["outcome"]["sentence"] and Ledger.of(exp).plan()["stage"] == 2


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
