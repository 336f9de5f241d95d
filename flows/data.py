"""Data preparation flow: synthesize (synthetic source only) -> import -> validate."""
from __future__ import annotations

from typing import Dict, List, Optional

from prefect import flow

from flows.config import resolve
from tasks.common import result_storage
from tasks.data import current_manifest_hash, import_task, synthesize_task, validate_task


@flow(name="pillsnap-data")
def data_flow(profile: Optional[str] = None, overrides: Optional[List[str]] = None,
              config_path: Optional[str] = None) -> Dict:
    config = resolve(config_path, profile, overrides)
    synthesized = synthesize_task(config) if config["data"]["source"] == "synthetic" else None
    imported = import_task(config)
    validation = validate_task.with_options(result_storage=result_storage(config))(
        config, current_manifest_hash(config))
    return {"synthesized": synthesized, "imported": imported, "validation": validation}
