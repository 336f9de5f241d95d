"""The one-time final test on the sealed test split (only after an approved Stage 4)."""
from __future__ import annotations

from typing import Dict, List, Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.config import resolve
from flows.hooks import notify_on_failure
from tasks.common import cfg_of, library_logs_in_run


@task(name="final-test")
def final_test_task(config: Dict, force: bool = False) -> Dict:
    from pillsnap.evaluate.final_test import run_final_test
    with library_logs_in_run():
        return run_final_test(cfg_of(config), force=force)


@flow(name="pillsnap-final-test", on_failure=[notify_on_failure])
def final_test_flow(profile: Optional[str] = None, overrides: Optional[List[str]] = None,
                    config_path: Optional[str] = None, force: bool = False) -> Dict:
    config = resolve(config_path, profile, overrides)
    results = final_test_task(config, force)
    create_markdown_artifact(
        f"# Final test\n\n- recommendation: **{results.get('recommendation')}**\n"
        f"- business goals met: {results.get('business_goals', {}).get('overall_target_met')}\n"
        f"- improvements: {results.get('improvements')}\n", key="final-test-report")
    return results
