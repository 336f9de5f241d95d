"""ONNX export of the stage's models with the torch parity check."""
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
