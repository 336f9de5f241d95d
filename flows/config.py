"""Resolve the one typed config at the flow's entry and hand it to tasks as a plain, hashable dict."""
from __future__ import annotations

from typing import Dict, List, Optional

from pillsnap.config import load_config, save_resolved, to_dict
from pillsnap.evaluate.criteria import validate_evaluation_config
from pillsnap.environment import overrides_from_environment, prepare_process
from tasks.common import run_name


def resolve(config_path: Optional[str], profile: Optional[str], overrides: Optional[List[str]]) -> Dict:
    """The flow's entry: environment settings become overrides here (the library reads none itself). The resolved
    config is kept under the flow run's id (config.resolved.<run>.yaml)."""
    cfg = load_config(config_path, profile, [*(overrides or []), *overrides_from_environment()])
    validate_evaluation_config(cfg.evaluation)  # stage tables and check names, before any work
    prepare_process(cfg.exp_dir)
    save_resolved(cfg, run_name())
    return to_dict(cfg)
