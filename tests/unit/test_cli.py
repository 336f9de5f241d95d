"""The `pillsnap` command line: every subcommand has --help; bad config input fails with the key named."""
import json

import pytest

from flows.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--profile" in out and "key=value" in out


def test_bad_override_is_a_clear_error(capsys):
    assert main(["subset", "--profile", "ci", "train.batch_sise=4"]) == 2
    assert "train.batch_sise" in capsys.readouterr().err


def test_synth_import_validate_subset_from_the_command_line(tmp_path, capsys):
    common = ["--profile", "ci", f"paths.exp_dir={tmp_path / 'exp'}", f"synth.out_dir={tmp_path / 'd'}",
              "synth.num_classes=3", "synth.images_per_class=4", "synth.combinations=1"]
    assert main(["synth", *common]) == 0
    assert json.loads(capsys.readouterr().out)["single"] == 3 * (4 + 2)  # train + sealed test photos
    assert main(["import", *common]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["classes"] == 3 and imported["issues"] == 0
    assert main(["validate", *common]) == 0
    assert "verdict: PASS" in capsys.readouterr().out
    assert main(["subset", "--stage", "1", *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == 3 and summary["train_single"] + summary["val_single"] == 12
    assert (tmp_path / "exp/data/stage_1/subset.csv").is_file()
    assert (tmp_path / "exp/config.resolved.yaml").is_file()


def test_the_demo_passes_only_when_both_halves_work():
    from flows.cli import demo_verdicts
    from pillsnap.config import load_config

    cfg = load_config(profile="cpu-demo")
    checks = {n: "pass" for n in cfg.evaluation.stages[1].mandatory_checks}
    good = {"go_no_go": "GO", "checks": checks,
            "detection": {"combination": {"detection_recall": 0.986, "per_pill_accuracy": 0.91}}}
    assert all(ok for _, ok in demo_verdicts(cfg, good))
    blind = {**good, "detection": {"combination": {"detection_recall": 0.0, "per_pill_accuracy": None}}}
    verdicts = dict(demo_verdicts(cfg, blind))
    assert [ok for ok in verdicts.values()] == [True, True, False, False]
    assert "per-pill accuracy not measured (>= 0.7)" in " ".join(verdicts)
    unmeasured = {**good, "checks": {**checks, "pipeline_complete": "not_measured"}}
    assert not dict(demo_verdicts(cfg, unmeasured))[f"mandatory checks: {unmeasured['checks']}"]


def test_attest_records_a_named_person_and_refuses_what_is_not_attested(tmp_path, capsys):
    from pillsnap.ledger import Ledger

    exp = f"paths.exp_dir={tmp_path / 'exp'}"
    assert main(["attest", "--stage", "4", "--check", "pipeline_complete", "--reviewer", "kim", exp]) == 2
    assert "not an attested check" in capsys.readouterr().err
    assert main(["attest", "--stage", "4", "--check", "cloudflare_tunnel_setup", "--reviewer", "pharmacist kim",
                 "--note", "tunnel to api checked", exp]) == 0
    pending = Ledger.of(tmp_path / "exp").pending_attestations(4)
    assert pending["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"


def test_a_forced_final_test_needs_a_name_and_a_reason(tmp_path, capsys):
    exp = f"paths.exp_dir={tmp_path / 'exp'}"
    assert main(["final-test", "--force", "--reason", "again", exp]) == 2
    assert "--force needs --reviewer NAME and --reason TEXT" in capsys.readouterr().err
    assert main(["final-test", "--force", "--reviewer", "kim", "--reason", " ", exp]) == 2


def test_reopen_needs_a_final_test_and_says_why_not(tmp_path, capsys):
    assert main(["reopen", "--reviewer", "kim", "--reason", "more data", f"paths.exp_dir={tmp_path / 'exp'}"]) == 2
    assert "no final test has run" in capsys.readouterr().err


def _stopped_step(**extra):
    return {"stage": 2, "decision": "NO_GO", "reasons": ["ACC_BELOW_TARGET"], "recommendation": "WARN_STOP",
            "choice": "stop", "chosen_by": "policy", "approved": False,
            "stop_reason": "an unattended policy never approves a stage Go/No-Go refused",
            "blocked_by": {"gate_rows": ["accuracy 0.41 (needs >= 0.818)"], "mandatory": {}}, **extra}


def test_progress_ends_with_one_sentence_and_a_distinct_exit_code_when_a_gate_stopped_it(monkeypatch, capsys):
    import flows.progressive
    from flows.progressive import outcome
    from flows.cli import EXIT_GATE_STOPPED

    sentence = outcome([{"stage": 1, "decision": "GO", "approved": True, "choice": "proceed"}, _stopped_step()])
    assert sentence["gate_stopped"] and sentence["sentence"].startswith("Stopped at Stage 2: Go/No-Go NO_GO "
                                                                        "(ACC_BELOW_TARGET), advisor WARN_STOP")
    assert "Next: fix Go/No-Go accuracy 0.41 (needs >= 0.818) (stage_2/reports/advisor.json" in sentence["sentence"]
    assert "attest" not in sentence["sentence"]
    result = {"mode": "run", "steps": [_stopped_step()], "outcome": sentence}
    monkeypatch.setattr(flows.progressive, "progressive_flow", lambda **kw: result)
    assert main(["progress", "--mode", "run", "--profile", "ci"]) == EXIT_GATE_STOPPED
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == sentence["sentence"]
    done = {**result, "outcome": outcome([{"final_test": {"recommendation": "NEEDS_IMPROVEMENT",
                                                          "sealed_split_evaluations": 1}}])}
    monkeypatch.setattr(flows.progressive, "progressive_flow", lambda **kw: done)
    assert main(["progress", "--mode", "run", "--profile", "ci"]) == 0


def test_a_refused_stage_exits_with_its_own_code_and_the_reason(tmp_path, monkeypatch, capsys):
    import flows.stage
    from flows.cli import EXIT_REFUSED
    from pillsnap.ledger import Ledger

    def refuse(**kw):
        Ledger.of(tmp_path).check_stage_may_run(kw["stage"], kw["without_approved_predecessor"])

    monkeypatch.setattr(flows.stage, "stage_flow", refuse)
    assert main(["stage", "--stage", "2", "--profile", "ci"]) == EXIT_REFUSED
    assert "Stage 1 has no decision" in capsys.readouterr().err


def test_checks_lists_every_check_with_its_definition_and_stages(capsys):
    from pillsnap.evaluate.checks.registry import DEFINITIONS

    assert main(["checks"]) == 0
    out = capsys.readouterr().out
    for name, definition in DEFINITIONS.items():
        assert f"{name} (" in out and definition in out
    assert "cloudflare_tunnel_setup (attested by a named person; mandatory at stage 4)" in out
    assert "pipeline_complete (measured; mandatory at stage 1)" in out
