"""The Stage 1 demo as one parent flow: data preparation, then Stage 1 (both visible as subflows in the UI)."""
from __future__ import annotations

from typing import Dict, List, Optional

from prefect import flow

from flows.data import data_flow
from flows.hooks import notify_on_failure
from flows.stage import stage_flow


@flow(name="pillsnap-demo", on_failure=[notify_on_failure])
def demo_flow(profile: str = "cpu-demo", overrides: Optional[List[str]] = None,
              config_path: Optional[str] = None) -> Dict:
    data = data_flow(profile=profile, overrides=overrides, config_path=config_path)
    stage = stage_flow(stage=1, profile=profile, overrides=overrides, config_path=config_path)
    return {"data": data, "stage": stage}
