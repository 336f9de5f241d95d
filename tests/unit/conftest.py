"""One tiny trained stage shared by the export and predict tests: a classifier trained for 2 epochs on the ci
profile's synthetic set, and a random-init YOLO11n detector saved in our detector checkpoint schema (its boxes
are meaningless, which is fine for parity and pipeline structure; tests that count crops inject known boxes)."""
import contextlib
from pathlib import Path

import pytest
import torch

from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import class_map_path, run_import, run_subset
from pillsnap.data.subsets import read_subset
from pillsnap.core import layout


@contextlib.contextmanager
def one_torch_thread():
    """The CPU is shared (other test runs, other engineers): one intra-op thread avoids oversubscription stalls
    that make tiny convolutions 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_torch_thread():
        yield


def stage_config(make_config, root: Path, aihub: Path, *overrides: str):
    return make_config(root, f"synth.out_dir={aihub}", f"paths.data_root={aihub}", "logging.tensorboard=false",
                       "export.parity_samples=12", *overrides)


def save_random_detector(cfg, stage: int) -> Path:
    from pillsnap.models.detector import backbone_name, build_detector, detector_payload
    from pillsnap.core.checkpoints import save_checkpoint

    model = build_detector(cfg.detection, cfg.exp_dir / "detector_model", pretrained=False)
    payload = detector_payload(model, backbone_name(cfg.detection), cfg.detection.image_size)
    return save_checkpoint(layout.detector_checkpoint(cfg.exp_dir, stage), payload)


@pytest.fixture(scope="session")
def trained_stage(tmp_path_factory, tiny_aihub, make_config):
    """(cfg, subset, class map) of stage 1 with classifier and detector best.pt in their usual places."""
    from pillsnap.train import train_stage

    cfg = stage_config(make_config, tmp_path_factory.mktemp("infer"), tiny_aihub)
    with one_torch_thread():
        run_import(cfg, show_progress=False)
        run_subset(cfg, 1)
        subset, _ = read_subset(cfg.exp_dir, 1)
        class_map = ClassMap.load(class_map_path(cfg))
        train_stage(cfg, subset, class_map, 1, layout.stage_dir(cfg.exp_dir, 1), show_progress=False,
                    models=("classifier",))
        save_random_detector(cfg, 1)
    return cfg, subset, class_map


@pytest.fixture(scope="session")
def exported_stage(trained_stage):
    """trained_stage after a successful `export_stage` (the report is returned too)."""
    from pillsnap.infer.export import export_stage

    cfg, subset, class_map = trained_stage
    with one_torch_thread():
        report = export_stage(cfg, 1, subset, class_map)
    return cfg, subset, class_map, report
