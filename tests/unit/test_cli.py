"""The `pillsnap` command line: every subcommand has --help; bad config input fails with the key named."""
import json

import pytest

from pillsnap.cli import COMMANDS, main


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
    from pillsnap.cli import demo_verdicts
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
