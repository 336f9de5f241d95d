"""ONNX export of the stage's models with the torch parity check, and the API check on those exports."""
from __future__ import annotations

from typing import Dict

from prefect import task

from pillsnap.infer.export import ExportParityError, export_stage
from tasks.common import cfg_of, library_logs_in_run


@task(name="export-onnx")
def export_task(config: Dict, stage: int) -> Dict:
    """A failed export is a result (the stage's mandatory check onnx_conversion_success fails), not a crash."""
    with library_logs_in_run():
        try:
            return export_stage(cfg_of(config), stage)
        except ExportParityError as e:
            return {"ok": False, "error": str(e)}


@task(name="api-check")
def api_check_task(config: Dict, stage: int) -> Dict:
    """`pillsnap serve` on the stage's exports: ready, answers, p50/p95, img/s, /metrics (the gates read these)."""
    from pillsnap.data.subsets import read_subset
    from pillsnap.serve.smoke import api_smoke_test, smoke_photos

    cfg = cfg_of(config)
    with library_logs_in_run():
        subset, _ = read_subset(cfg.exp_dir, stage)
        return api_smoke_test(cfg, stage, smoke_photos(subset, cfg.serve.smoke_requests))
