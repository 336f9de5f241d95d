import pytest

from pillsnap.data.aihub import import_aihub
from pillsnap.data.class_map import build_class_map
from pillsnap.data.manifest import assign_splits


@pytest.fixture(scope="session")
def tiny_stage(tiny_aihub):
    """(manifest with splits, global class map) of the tiny synthetic set."""
    m = assign_splits(import_aihub(tiny_aihub, show_progress=False).manifest, 0.2, 0)
    return m, build_class_map(m)


def classifier_member(cfg, m, cmap, stage_dir, **kwargs):
    """A classifier unit with its data, as the loops build it (no training)."""
    from pillsnap.train.loops.members import classifier_member as build, run_policy

    return build(cfg, m, cmap, stage_dir, run_policy(cfg), show_progress=False, **kwargs)
