"""The one-time final test on the sealed test split (only after an approved Stage 4)."""
from __future__ import annotations

from typing import Dict, List, Optional

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.config import resolve
from flows.hooks import notify_on_failure
from tasks.common import cfg_of, library_logs_in_run, run_name


@task(name="final-test")
def final_test_task(config: Dict, forced_by: str = "", force_reason: str = "") -> Dict:
    from pillsnap.core.layout import resolved_config
    from pillsnap.evaluate.final_test import Forced, run_final_test

    cfg = cfg_of(config)
    forced = Forced(forced_by, force_reason) if (forced_by or force_reason) else None
    with library_logs_in_run():
        return run_final_test(cfg, forced, str(resolved_config(cfg.exp_dir, run_name())))


@flow(name="pillsnap-final-test", on_failure=[notify_on_failure])
def final_test_flow(profile: Optional[str] = None, overrides: Optional[List[str]] = None,
                    config_path: Optional[str] = None, forced_by: str = "", force_reason: str = "") -> Dict:
    """`forced_by`, `force_reason`: a named person repeats the test on a Stage 4 it already ran on, and why."""
    config = resolve(config_path, profile, overrides)
    results = final_test_task(config, forced_by, force_reason)
    overrides_text = "".join(f"\n  - {o}" for o in results.get("overrides") or []) or " none"
    create_markdown_artifact(
        f"# Final test {results.get('sealed_split_evaluations')}\n\n"
        f"- recommendation: **{results.get('recommendation')}**\n"
        f"- business goals met: {results.get('business_goals', {}).get('overall_target_met')}\n"
        f"- overrides:{overrides_text}\n"
        f"- earlier final tests: {len(results.get('earlier_final_tests') or [])}, reopenings: "
        f"{len(results.get('reopenings') or [])}\n"
        f"- improvements: {results.get('improvements')}\n", key="final-test-report")
    return results
