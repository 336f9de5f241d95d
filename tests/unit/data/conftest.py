import pytest

from pillsnap.data.aihub import import_aihub
from pillsnap.data.manifest import assign_splits


@pytest.fixture(scope="session")
def tiny_manifest(tiny_aihub):
    """The tiny synthetic set imported and split (val_fraction 0.2, seed 0)."""
    return assign_splits(import_aihub(tiny_aihub, show_progress=False).manifest, 0.2, 0)
