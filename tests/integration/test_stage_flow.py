"""stage_flow(1) end to end on the tiny synthetic set, through Prefect."""
import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.data import data_flow
from flows.stage import stage_flow

pytestmark = pytest.mark.integration


def _artifact(key: str):
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found


def test_stage_1_end_to_end(prefect_harness, flow_overrides):
    data = data_flow(profile="ci", overrides=flow_overrides)
    assert data["synthesized"]["skipped"] == "already present" and data["imported"]["classes"] == 6
    # Two loader workers: DataLoader workers must survive inside a Prefect run process.
    result = stage_flow(stage=1, profile="ci", overrides=[*flow_overrides, "detection.enabled=true",
                                                         "dataloader.num_workers=2"])
    exp = Path(result["exp_dir"])
    assert result["detection"] is not None and "mAP_0.5" in result["detection"]
    assert result["detection"]["combination"]["measured"] in (True, False)
    assert result["export_ok"], "classifier and detector export with torch parity"
    assert result["n_val"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert result["go_no_go"] in ("GO", "NO_GO") and result["choice"] in ("proceed", "stop", "rerun_optimized")
    for rel in ("config.resolved.yaml", "ledger.json", "data/manifest.csv", "data/class_map.json",
                "data/validation_report.json", "data/stage_1/subset.json", "stage_1/checkpoints/best.pt",
                "stage_1/checkpoints/last.pt", "stage_1/reports/metrics.json", "stage_1/reports/stage_report.md",
                "stage_1/logs/train.out", "stage_1/detector/checkpoints/best.pt", "stage_1/export/classifier.onnx",
                "stage_1/export/detector.onnx", "stage_1/export/export_report.json"):
        assert (exp / rel).is_file(), rel
    assert list((exp / "stage_1" / "tb").glob("events.out.tfevents.*"))
    ledger = json.loads((exp / "ledger.json").read_text())
    assert ledger["stages"][-1]["stage"] == 1 and ledger["stages"][-1]["chosen_by"] == "policy"
    report = (exp / "stage_1/reports/stage_report.md").read_text()
    assert "## Overview" in report and "6 classes" in report and "## Next actions" in report
    assert "[train] e=" in (exp / "stage_1/logs/train.out").read_text()
    markdown = _artifact("stage-1-report")
    assert markdown and "PillSnap Stage 1 report" in markdown[0].data
    assert _artifact("stage-1-targets") and _artifact("stage-1-training-progress")
