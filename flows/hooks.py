"""Flow state hooks: webhook notification on failure."""
from __future__ import annotations

from pillsnap.config import load_config
from pillsnap.notify import notify


def notify_on_failure(flow, flow_run, state) -> None:
    params = flow_run.parameters or {}
    try:
        cfg = load_config(params.get("config_path"), params.get("profile"), params.get("overrides") or [])
    except Exception:  # a config error is itself the failure being reported; nothing to notify with
        return
    notify(cfg.orchestration.webhook_url, "flow_failed",
           {"flow": flow.name, "flow_run": flow_run.name, "state": state.name, "message": state.message})
