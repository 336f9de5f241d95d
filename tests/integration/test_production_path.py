"""The production path: configs/pillsnap.yaml as shipped, Stage 1 -> Stage 4 -> the final test, on a synthetic
release shaped like AIHub's (unequal class sizes; combination photos whose pills come from every class).

Only sizes are overridden: image sizes, the backbone, counts, epochs, and min_eval_samples scaled with the counts.
The strategy (interleaved), the detector, the review policy, the checks and every gate are the shipped ones.
Where a check needs a person (Stage 4's attested cloudflare_tunnel_setup) the test answers as a person would:
a named reviewer attests it ahead of the unattended run (`pillsnap attest`), and the ledger keeps the name.
"""
import json

import pytest

from flows.data import data_flow
from flows.progressive import progressive_flow
from pillsnap.config import load_config
from pillsnap.data.synth import synthesize
from pillsnap.ledger import Ledger

pytestmark = pytest.mark.integration

SYNTH = ["synth.num_classes=8", "synth.images_per_class=40", "synth.images_per_class_min=28",
         "synth.test_images_per_class=4", "synth.combinations=10", "synth.test_combinations=3",
         "synth.images_per_combination=2", "synth.width=96", "synth.height=128", "synth.pill_scale=0.5",
         "synth.workers=2"]
STAGES = {1: (2, 60, 60, 8), 2: (4, 120, 60, 16), 3: (6, 180, 70, 24), 4: ("null", 400, 80, 30)}
SIZES = [f"data.stages.{n}.{key}={value}" for n, row in STAGES.items()
         for key, value in zip(("classes", "images", "detector_images", "min_eval_samples"), row)] + [
    "classification.backbone=test_efficientnet", "classification.image_size=96", "classification.pretrained=false",
    # The detector trains from scratch at toy size: at 64 px / 5 epochs / lr 0.001 it never found a pill (mAP 0 in
    # every epoch), which the old score hid. 96 px, 10 epochs and a from-scratch LR reach mAP@0.5 ~0.86 on Stage 1.
    "detection.image_size=96", "detection.scale=n", "detection.pretrained=false", "train.detection.lr=0.01",
    "train.classification.epochs=20", "train.classification.batch_size=8",
    "train.detection.epochs=10", "train.detection.batch_size=4", "train.warmup_steps=10",
    "serve.smoke_requests=16",
    # The shipped optimization runs as configured (bf16 autocast, channels_last, torch.compile): the compile is
    # traced by aot_eager, because inductor's code generation for 2 models x 4 stages takes ~20 min on 2 cores.
    "optimization.compile_backend=aot_eager"]
SHIPPED = ("train.strategy", "train.interleave_ratio", "detection.enabled", "detection.include_single_images",
           "orchestration", "evaluation.stages", "evaluation.advisor", "evaluation.recommendation",
           "evaluation.checks")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    cfg = load_config(overrides=SYNTH)
    synthesize(cfg.synth, root / "aihub", show_progress=False)
    return root


def test_the_sizes_touch_nothing_the_shipped_config_decides():
    from omegaconf import OmegaConf

    shipped = OmegaConf.structured(load_config())
    tested = OmegaConf.structured(load_config(overrides=[*SYNTH, *SIZES]))
    for key in SHIPPED:
        assert OmegaConf.select(shipped, key) == OmegaConf.select(tested, key), key
    assert tested.train.strategy == "interleaved" and tested.detection.enabled


# A hang guard, not a speed target: 280-480 s on the 2-core machine of 2026-12-06, ~1,190 s on one without AVX-512
# (bf16 autocast emulated: 4.4x an fp32 step), near the 1200 s the guard was; the suite default is 600 s.
@pytest.mark.timeout(2400)
def test_shipped_config_runs_stage_1_to_the_final_test(prefect_harness, release):
    overrides = [*SYNTH, *SIZES, f"paths.data_root={release / 'aihub'}", f"paths.exp_dir={release / 'exp'}"]
    exp = release / "exp"
    Ledger.of(exp).attest(4, "cloudflare_tunnel_setup", "pharmacist kim", "tunnel to the API checked by hand")
    data_flow(overrides=overrides)
    out = progressive_flow(start_stage=1, end_stage=4, mode="run", overrides=overrides)

    steps = out["steps"]
    assert [s.get("stage") for s in steps[:4]] == [1, 2, 3, 4], steps
    assert all((s["decision"], s["choice"]) == ("GO", "proceed") for s in steps[:4]), steps
    assert not out["outcome"]["gate_stopped"] and "final test run 1" in out["outcome"]["sentence"]
    final = steps[4]["final_test"]
    ledger = Ledger.of(exp)
    for stage in (1, 2, 3, 4):
        rec = ledger.latest(stage)
        assert rec.approved and rec.chosen_by == "policy" and not rec.override
        assert rec.recommendation == "RECOMMEND_PROCEED"
        checks = json.loads((exp / f"stage_{stage}/reports/checks.json").read_text())
        assert rec.checks == {n: c["status"] for n, c in checks.items()}
        mandatory = {n: c["status"] for n, c in checks.items() if c["mandatory"]}
        assert set(mandatory) == set(load_config().evaluation.stages[stage].mandatory_checks)
        expected = {n: ("attested" if n == "cloudflare_tunnel_setup" else "pass") for n in mandatory}
        assert mandatory == expected, stage
        assert not [n for n, c in checks.items() if c["status"] in ("not_applicable", "unattested") and
                    n != "cloudflare_tunnel_setup"], "the shipped config rules nothing out"
        for name in ("go_no_go.json", "advisor.json", "stage_report.md"):
            assert (exp / f"stage_{stage}/reports" / name).is_file()
        regression = next(r for r in json.loads((exp / f"stage_{stage}/reports/go_no_go.json").read_text())["rows"]
                          if r["name"] == "accuracy_regression")
        # Like for like from Stage 2 on: this model on the previous stage's val photos, against that model there.
        assert regression["status"] == ("skipped" if stage == 1 else "pass"), (stage, regression)
    assert ledger.latest(4).attestations["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"
    assert ledger.latest(2).checks["auto_batch_tuning_success"] == "pass"  # real probes of host memory
    subsets = [json.loads((exp / f"data/stage_{n}/subset.json").read_text()) for n in (1, 2, 3, 4)]
    assert [s["classes"] for s in subsets] == [2, 4, 6, 8]
    assert all(s["train_combination"] > 0 and s["combinations_in_scope"] < s["train_combination"] + s[
        "val_combination"] for s in subsets[:3]), "combinations draw from classes later stages add"
    results = json.loads((exp / "final/reports/final_test_results.json").read_text())
    assert ledger.final_test["results"] == str(exp / "final/reports/final_test_results_001.json")
    tested = results["test_results"]
    assert tested["classification"]["n"] > 0 and tested["combination"]["measured"], tested
    # The sizes scale min_eval_samples down: a validation-size gate looser than the shipped one, on every record
    # and named in the verdict, which can therefore never be plain READY_FOR_PRODUCTION.
    shipped = load_config()
    assert results["overrides"] == [f"Stage {n}: gate data.stages.{n}.min_eval_samples: "
                                    f"{shipped.stage(n).min_eval_samples} shipped, {STAGES[n][3]} applied (looser)"
                                    for n in (1, 2, 3, 4)]
    assert final["recommendation"] == results["recommendation"] != "READY_FOR_PRODUCTION"
    assert results["sealed_split_evaluations"] == 1 and results["config"]["differences"] == []
    assert results["stage_4_decision"]["attestations"]["cloudflare_tunnel_setup"]["reviewer"] == "pharmacist kim"
    # The final test loaded what Stage 4's decision judged, by content; the verdict says at what scale it trained.
    assert results["models"] == {m: v["sha256"] for m, v in ledger.latest(4).evidence["models"].items()}
    assert results["stage_4_decision"]["scale"]["world_size"] == 1 and results["test_data"]["training_twins"][
        "measured"]
    assert "detection.mAP_0.5" in results["val_vs_test"]["metrics"]
