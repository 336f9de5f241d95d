"""Optional webhook notifications (orchestration.webhook_url): failures and stage decisions.

A notification never breaks a run: errors are logged and swallowed.
"""
from __future__ import annotations

import json
import logging
import urllib.request
from typing import Dict, Optional

log = logging.getLogger(__name__)


def notify(webhook_url: Optional[str], event: str, payload: Dict, timeout_s: float = 5.0) -> bool:
    if not webhook_url:
        return False
    body = json.dumps({"event": event, **payload}, default=str).encode()
    request = urllib.request.Request(webhook_url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return 200 <= response.status < 300
    except Exception as e:  # a notification is best effort
        log.warning("webhook %s for %s failed: %s", webhook_url, event, e)
        return False
