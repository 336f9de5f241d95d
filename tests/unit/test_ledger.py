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


def _decided(stage, go_no_go, advice, checks, choice="proceed", chosen_by="policy", reviewer=""):
    from pillsnap.ledger import decide

    return decide(stage, go_no_go, advice, choice, chosen_by, reviewer, checks=checks)


NO_GO_ROWS = {"decision": "NO_GO", "reasons": ["ACC_BELOW_TARGET"],
              "rows": [{"name": "accuracy", "status": "fail", "measured": 0.41, "comparison": ">=", "target": 0.778},
                       {"name": "latency_p95_ms", "status": "pass", "measured": 12.0, "comparison": "<=",
                        "target": 220.0}]}
GO_ROWS = {"decision": "GO", "reasons": [], "rows": [{"name": "accuracy", "status": "pass", "measured": 0.9,
                                                      "comparison": ">=", "target": 0.848}]}


def test_a_no_go_names_its_failed_rows_and_no_check_it_did_not_need(tmp_path):
    """Issue 28, reproduction 7: Stage 1 NO_GO on accuracy said "confirm the attested checks" because the list
    covered every check (cloudflare_tunnel_setup is unattested at every stage, mandatory only at Stage 4)."""
    advice = {"recommendation": "WARN_STOP", "failed_mandatory": []}
    ledger = Ledger.of(tmp_path)
    ledger.record(_decided(1, NO_GO_ROWS, advice, {"cloudflare_tunnel_setup": "unattested", "accuracy": "fail"}))
    plan = Ledger.of(tmp_path).plan()
    assert plan["action"] == "blocked" and plan["unattested"] == []
    assert plan["blocked_by"] == {"gate_rows": ["accuracy 0.41 (needs >= 0.778)"], "mandatory": {}}
    from flows.progressive import outcome

    sentence = outcome([plan])["sentence"]
    assert "fix Go/No-Go accuracy 0.41 (needs >= 0.778)" in sentence and "attest" not in sentence


def test_an_attestation_given_ahead_lets_progress_judge_the_stored_results_again(tmp_path):
    """Issue 28, reproduction 7: after attesting at Stage 4, `pillsnap progress` stayed blocked until the stage was
    re-run by hand. A stage stopped only by unattested mandatory checks is re-judged once every one is attested."""
    from flows.progressive import outcome

    ledger = Ledger.of(tmp_path)
    for stage in (1, 2, 3):
        ledger.record(StageRecord(stage=stage, decision="GO", choice="proceed", chosen_by="policy"))
    advice = {"recommendation": "WARN_STOP", "failed_mandatory": ["cloudflare_tunnel_setup"]}
    ledger.record(_decided(4, GO_ROWS, advice, {"cloudflare_tunnel_setup": "unattested"}))
    blocked = Ledger.of(tmp_path).plan()
    assert blocked["action"] == "blocked" and blocked["unattested"] == ["cloudflare_tunnel_setup"]
    sentence = outcome([blocked])["sentence"]
    assert "a named person confirms cloudflare_tunnel_setup (`pillsnap attest --stage 4" in sentence
    assert "then `pillsnap progress` judges the stored results again" in sentence
    Ledger.of(tmp_path).attest(4, "cloudflare_tunnel_setup", "pharmacist kim", "tunnel checked")
    assert Ledger.of(tmp_path).plan() == {"action": "rejudge", "stage": 4, "attested": ["cloudflare_tunnel_setup"]}
    # ... but never where something else stopped it too: a failed measured check still needs the stage re-run
    advice = {"recommendation": "WARN_STOP", "failed_mandatory": ["cloudflare_tunnel_setup", "automated_monitoring"]}
    ledger = Ledger.of(tmp_path)
    ledger.record(_decided(4, GO_ROWS, advice, {"cloudflare_tunnel_setup": "unattested",
                                                "automated_monitoring": "fail"}))
    ledger.attest(4, "cloudflare_tunnel_setup", "pharmacist kim")
    plan = Ledger.of(tmp_path).plan()
    assert plan["action"] == "blocked" and "mandatory check automated_monitoring fail" in outcome([plan])["sentence"]


def test_a_proceed_without_a_name_approves_nothing():
    """Issue 28, reproduction 4: a review `proceed` with a blank reviewer approved a NO_GO stage anonymously."""
    advice = {"recommendation": "WARN_STOP", "failed_mandatory": []}
    for reviewer in ("", "   "):
        rec = _decided(1, NO_GO_ROWS, advice, {}, choice="proceed", chosen_by="human", reviewer=reviewer)
        assert rec.choice == "stop" and not rec.approved and not rec.override and "without the reviewer" in \
            rec.stop_reason
    named = _decided(1, NO_GO_ROWS, advice, {}, choice="proceed", chosen_by="human", reviewer=" pharmacist kim ")
    assert named.approved and named.override and named.reviewer == "pharmacist kim"
    legacy = StageRecord(stage=1, decision="NO_GO", choice="proceed", chosen_by="human", overridden=["X"])
    assert not legacy.approved  # an anonymous approval in an older ledger counts for nothing either
