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
