"""Test-wide environment: offline, no telemetry, everything written under pytest's temp dirs."""
import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="pillsnap-yolo-"))
os.environ.setdefault("MPLBACKEND", "Agg")
