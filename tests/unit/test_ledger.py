"""ledger.json and the scheduled "advance" plan read from it."""
import pytest

from pillsnap.ledger import Ledger, StageRecord


def _ledger(tmp_path, *records):
    ledger = Ledger.of(tmp_path)
    for stage, decision, choice in records:
        ledger.record(StageRecord(stage=stage, decision=decision, choice=choice,
                                  overrides=["loss.label_smoothing=0.2"] if choice == "rerun_optimized" else []))
    return Ledger.of(tmp_path)  # read back from disk


def test_empty_ledger_runs_stage_one(tmp_path):
    assert _ledger(tmp_path).plan() == {"action": "run", "stage": 1, "overrides": []}


def test_next_stage_after_an_approved_go(tmp_path):
    assert _ledger(tmp_path, (1, "GO", "proceed")).plan()["stage"] == 2


@pytest.mark.parametrize("decision,choice", [("NO_GO", "stop"), ("GO", "stop"), ("NO_GO", "proceed")])
def test_not_approved_blocks_progress(tmp_path, decision, choice):
    plan = _ledger(tmp_path, (1, "GO", "proceed"), (2, decision, choice)).plan()
    assert plan["action"] == "blocked" and plan["stage"] == 2 and choice in plan["why"]


def test_rerun_optimized_runs_the_stage_again_with_the_overrides(tmp_path):
    plan = _ledger(tmp_path, (1, "NO_GO", "rerun_optimized")).plan()
    assert plan == {"action": "run", "stage": 1, "overrides": ["loss.label_smoothing=0.2"]}


def test_final_test_only_after_an_approved_stage_four_and_only_once(tmp_path):
    three = [(s, "GO", "proceed") for s in (1, 2, 3)]
    assert _ledger(tmp_path, *three).plan()["stage"] == 4
    ledger = _ledger(tmp_path / "b", *three, (4, "GO", "proceed"))
    assert ledger.plan() == {"action": "final", "stage": None}
    ledger.record_final_test({"recommendation": "NEEDS_IMPROVEMENT"})
    assert Ledger.of(tmp_path / "b").plan()["action"] == "done"


def test_latest_record_wins_and_range_is_respected(tmp_path):
    ledger = _ledger(tmp_path, (1, "NO_GO", "stop"), (1, "GO", "proceed"))
    assert ledger.next_stage() == 2 and len(ledger.records) == 2
    assert ledger.plan(start=1, end=1)["action"] == "done"


GO = {"decision": "GO", "reasons": []}
NO_GO = {"decision": "NO_GO", "reasons": ["ACC_BELOW_TARGET"]}
PROCEED_ADVICE = {"recommendation": "RECOMMEND_PROCEED", "failed_mandatory": []}
UNATTESTED_ADVICE = {"recommendation": "WARN_STOP", "message": "mandatory checks not passed: cloudflare_tunnel_setup",
                     "failed_mandatory": ["cloudflare_tunnel_setup"]}


def test_a_policy_never_proceeds_a_no_go_and_the_record_says_stop_and_why():
    from pillsnap.ledger import decide

    rec = decide(1, NO_GO, PROCEED_ADVICE, "proceed", "policy")
    assert rec.choice == "stop" and not rec.approved and "ACC_BELOW_TARGET" in rec.stop_reason
    assert "never approves" in rec.stop_reason and not rec.override


def test_a_policy_never_proceeds_past_an_unattested_mandatory_check():
    from pillsnap.ledger import decide

    rec = decide(4, GO, UNATTESTED_ADVICE, "proceed", "policy")  # e.g. unattended_policy.WARN_STOP=proceed
    assert rec.choice == "stop" and not rec.approved and "cloudflare_tunnel_setup" in rec.stop_reason


def test_a_named_persons_proceed_over_findings_is_an_override_naming_them():
    from pillsnap.ledger import decide

    rec = decide(4, GO, UNATTESTED_ADVICE, "proceed", "human", "pharmacist kim")
    assert rec.approved and rec.override and rec.reviewer == "pharmacist kim"
    assert "cloudflare_tunnel_setup" in rec.overridden[0]
    clean = decide(4, GO, PROCEED_ADVICE, "proceed", "human", "pharmacist kim")
    assert clean.approved and not clean.override and clean.stop_reason == ""


def test_attestations_ahead_of_a_run_need_a_name_and_count_for_the_next_decision_only(tmp_path):
    ledger = Ledger.of(tmp_path)
    with pytest.raises(ValueError, match="name of the person"):
        ledger.attest(4, "cloudflare_tunnel_setup", "  ")
    ledger.attest(4, "cloudflare_tunnel_setup", "pharmacist kim", "tunnel api.example checked")
    pending = Ledger.of(tmp_path).pending_attestations(4)
    assert pending["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"
    assert pending["cloudflare_tunnel_setup"]["source"] == "ledger" and Ledger.of(tmp_path).pending_attestations(3) == {}
    ledger.record(StageRecord(stage=4, decision="GO", choice="proceed"))
    assert Ledger.of(tmp_path).pending_attestations(4) == {}  # used by that decision; a re-run needs a new one


def test_a_stage_refuses_to_run_after_an_unapproved_predecessor_unless_a_person_says_why(tmp_path):
    from pillsnap.ledger import StageRefused

    ledger = _ledger(tmp_path, (1, "NO_GO", "stop"))
    assert ledger.check_stage_may_run(1) == ""
    with pytest.raises(StageRefused, match="Stage 1 is NO_GO with choice 'stop'.*--without-approved-predecessor"):
        ledger.check_stage_may_run(2)
    with pytest.raises(StageRefused, match="Stage 2 has no decision"):
        ledger.check_stage_may_run(3)
    reason = ledger.check_stage_may_run(2, "kim: the baseline is being rebuilt")
    assert reason == "run without an approved Stage 1: kim: the baseline is being rebuilt"
    assert _ledger(tmp_path / "b", (1, "GO", "proceed")).check_stage_may_run(2) == ""


def test_stage_4_after_a_final_test_needs_a_recorded_reopen(tmp_path):
    from pillsnap.ledger import StageRefused

    ledger = _ledger(tmp_path, *[(s, "GO", "proceed") for s in (1, 2, 3, 4)])
    with pytest.raises(ValueError, match="no final test"):
        ledger.reopen(4, "kim", "more data")
    ledger.record_final_test({"recommendation": "NEEDS_IMPROVEMENT", "evaluated_at": "t1"})
    with pytest.raises(StageRefused, match="evaluated 1 time.*pillsnap reopen --stage 4"):
        ledger.check_stage_may_run(4)
    with pytest.raises(ValueError, match="reason"):
        ledger.reopen(4, "kim", " ")
    ledger.reopen(4, "kim", "500 more photos per weak class")
    ledger = Ledger.of(tmp_path)
    assert ledger.check_stage_may_run(4) == "" and ledger.reopenings[0]["reviewer"] == "kim"
    assert ledger.plan() == {"action": "run", "stage": 4, "overrides": []}  # the reopened stage trains again
    ledger.record(StageRecord(stage=4, decision="GO", choice="proceed"))
    assert Ledger.of(tmp_path).plan()["action"] == "final"  # a new Stage 4: a new (counted) final test


def test_a_ledger_written_before_numbered_final_tests_is_read(tmp_path):
    import json

    old = {"stages": [{"stage": s, "decision": "GO", "choice": "proceed"} for s in (1, 2, 3, 4)],
           "final_test": {"results": "r.json"}}
    (tmp_path / "ledger.json").write_text(json.dumps(old))
    ledger = Ledger.of(tmp_path)
    assert ledger.final_test["results"] == "r.json" and ledger.final_test["number"] == 1
    assert ledger.plan()["action"] == "done"  # its final test ran after its Stage 4
