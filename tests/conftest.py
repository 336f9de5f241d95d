"""Test-wide environment: offline, no telemetry, everything written under pytest's temp dirs."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "YOLO_CONFIG_DIR" not in os.environ:
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="pillsnap-yolo-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], True)
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pillsnap.config import PillSnapConfig, load_config  # noqa: E402


def tiny_config(tmp: Path, *overrides: str) -> PillSnapConfig:
    """The `ci` profile pointed at a temp experiment dir: tiny synthetic data, tiny model, CPU."""
    return load_config(profile="ci", overrides=[f"paths.exp_dir={tmp / 'exp'}", f"synth.out_dir={tmp / 'aihub'}",
                                                f"paths.data_root={tmp / 'aihub'}", *overrides])


@pytest.fixture(scope="session")
def make_config():
    """tiny_config as a fixture, for tests that need their own experiment dir."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_aihub(tmp_path_factory) -> Path:
    """A small synthetic AIHub tree (train + sealed val), generated once per test session. Read-only."""
    from pillsnap.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "aihub"
    cfg = tiny_config(root.parent)
    synthesize(cfg.synth, root, show_progress=False)
    return root
