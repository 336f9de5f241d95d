"""Pre-training checks: resources via fakes, config sanity."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest

from pillsnap.config import load_config
from pillsnap.train.preflight import PreflightError, PrecheckRequirements, run_preflight

GB = 10**9


@pytest.fixture(scope="module")
def base_cfg():
    return load_config()


@pytest.fixture
def cfg(base_cfg, tmp_path):
    cfg = copy.deepcopy(base_cfg)
    cfg.paths.data_root = str(tmp_path / "data")
    cfg.paths.exp_dir = str(tmp_path / "exp" / "not-yet-created")
    return cfg


def plenty_of_everything(**overrides):
    fakes = dict(
        disk_usage=lambda path: SimpleNamespace(total=1000 * GB, used=100 * GB, free=900 * GB),
        virtual_memory=lambda: SimpleNamespace(available=64 * GB, total=128 * GB),
        gpu_free_total=lambda: None,
        reachable=lambda host: True,  # the hubs (no download happens in a precheck)
    )
    fakes.update(overrides)
    return fakes


def test_everything_fine_returns_report(cfg):
    report = run_preflight(cfg, stage=1, class_map_size=50, model_num_classes=50, **plenty_of_everything())
    assert report.ok and {r.name for r in report.results} >= {"gpu", "ram", "disk_data", "disk_exp", "config"}
    assert report.to_dict()["ok"] is True


def test_short_disk_names_path_and_numbers(cfg):
    measured = []

    def disk_usage(path: Path):
        measured.append(path)
        return SimpleNamespace(total=1000 * GB, used=0, free=1.2 * GB)

    with pytest.raises(PreflightError) as info:
        run_preflight(cfg, requirements=PrecheckRequirements(min_free_disk_gb_exp=5, min_free_disk_gb_data=1),
                      **plenty_of_everything(disk_usage=disk_usage))
    assert info.value.report.problems == [f"free disk at {cfg.paths.exp_dir}: 1.2 GB < required 5 GB"]
    assert str(info.value).startswith("pre-training checks failed: free disk at")
    assert all(p.exists() for p in measured)  # a not-yet-created exp dir is measured at its existing parent


def test_low_ram_and_required_gpu_missing_are_both_reported(cfg):
    fakes = plenty_of_everything(virtual_memory=lambda: SimpleNamespace(available=2 * GB, total=4 * GB))
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg, requirements=PrecheckRequirements(min_available_ram_gb=8, min_free_gpu_gb=10), **fakes)
    problems = info.value.report.problems
    assert "available RAM: 2.0 GB < required 8 GB" in problems
    assert any("no GPU" in p for p in problems)


def test_gpu_memory_short(cfg):
    fakes = plenty_of_everything(gpu_free_total=lambda: (3 * GB, 16 * GB))
    with pytest.raises(PreflightError, match=r"free GPU memory: 3.0 of 16.0 GB \(< required 10 GB\)"):
        run_preflight(cfg, requirements=PrecheckRequirements(min_free_gpu_gb=10), **fakes)


def test_config_sanity(cfg):
    cfg.detection.image_size = 650
    cfg.classification.image_size = 0
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg, stage=3, class_map_size=50, model_num_classes=49, **plenty_of_everything())
    message = str(info.value)
    assert "detection.image_size=650 must be a positive multiple of 32" in message
    assert "classification.image_size=0 must be positive" in message
    assert "data.stages[3].classes=1000 > class map size 50" in message
    assert "classifier has 49 outputs but the class map has 50" in message


def test_the_stage_4_pixel_cache_is_sized_before_anything_is_decoded(cfg, monkeypatch, tmp_path):
    """500K photos at 384 px need ~221 GB raw; with 100 GB free the check names both numbers and stops the stage.
    The JPEG rows that `auto` picks at the release's size (~22 GB estimated) fit."""
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=100 * GB, total=1000 * GB))
    samples = [(f"/data/aihub/train/K-{i % 4523:06d}_{i}.png", None) for i in range(500_000)]
    fakes = plenty_of_everything(disk_usage=lambda p: SimpleNamespace(free=100 * GB))
    cfg.dataloader.cache.format = "raw"
    with pytest.raises(PreflightError, match=r"pixel_cache|pixel cache") as info:
        run_preflight(cfg, cache_samples=samples, **fakes)
    detail = next(r.detail for r in info.value.report.results if r.name == "pixel_cache")
    assert "500000 samples, 0 already cached, 500000 to decode = 221.18 GB more" in detail
    assert "free 100.00 GB" in detail and "does NOT fit" in detail
    cfg.dataloader.cache.format = "jpeg"
    report = run_preflight(cfg, cache_samples=samples, **fakes)
    details = {r.name: r.detail for r in report.results}
    assert "500000 to decode = 22.12 GB more" in details["pixel_cache"] and "_jpeg90" in details["pixel_cache"]


def test_missing_pretrained_weights_offline_stop_the_run_before_any_data_work(cfg, monkeypatch, tmp_path):
    """The shipped config asks for both models' pretrained weights; offline with neither cached, the environment
    check (the stage flow's first step) names both keys and both ways out."""
    from ultralytics.utils import SETTINGS

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setitem(SETTINGS, "weights_dir", str(tmp_path / "no-weights"))
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg, **plenty_of_everything(reachable=lambda host: False))
    message = str(info.value)
    assert "classification.pretrained=true" in message and "classification.pretrained_path=" in message
    assert "detection.pretrained=true" in message and "detection.pretrained=false" in message
    local = tmp_path / "yolo11m.pt"
    local.write_bytes(b"weights")
    cfg.classification.pretrained = False
    cfg.detection.pretrained_path = str(local)
    report = run_preflight(cfg, **plenty_of_everything(reachable=lambda host: False))
    details = {r.name: r.detail for r in report.results}
    assert "local file" in details["weights_detector"] and "pretrained=false" in details["weights_classifier"]


def test_the_environment_check_says_which_pixel_store_format_and_why(cfg, tiny_aihub):
    """Before any work: the store's size in each format, the RAM and the disk, and the format `auto` chose."""
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.manifest import write_manifest
    from pillsnap.data.prepare import manifest_path

    before = run_preflight(cfg, weights=False, **plenty_of_everything())
    assert "decided after import" in {r.name: r.detail for r in before.results}["pixel_store"]
    write_manifest(import_aihub(tiny_aihub, show_progress=False).manifest, manifest_path(cfg))
    small_ram = plenty_of_everything(virtual_memory=lambda: SimpleNamespace(available=64 * GB, total=1000))
    detail = {r.name: r.detail for r in run_preflight(cfg, weights=False, **small_ram).results}["pixel_store"]
    assert " samples at 384px: raw " in detail and "jpeg ~" in detail and "free disk 900.0 GB" in detail
    assert "format jpeg: auto: jpeg (quality 90" in detail and "would not fit in half of the RAM" in detail


def test_only_node_0_runs_a_stage(cfg):
    """Two flows would decide, report and write the ledger for one stage: node k only joins (`train-node`)."""
    cfg.train.distributed.nnodes, cfg.train.distributed.node_rank = 2, 1
    with pytest.raises(PreflightError, match=r"train.distributed.node_rank=1: only node 0 runs a stage; .*"
                                             r"`pillsnap train-node`"):
        run_preflight(cfg, weights=False, **plenty_of_everything())


def test_the_detector_store_is_sized_beside_the_classifier_rows_before_anything_is_decoded(cfg, monkeypatch):
    """Stage 4's 60K detector photos at 640 px are ~74 GB of rows on the classifier store's disk. With 76 GB free
    each store alone fits, both together do not: the check says so with both numbers."""
    import pandas as pd

    from pillsnap.train.preflight import check_stage_stores

    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=76 * GB, total=1000 * GB))
    cfg.dataloader.cache.format = "jpeg"
    photos = [f"/data/aihub/train/K-{i % 4523:06d}_{i}.png" for i in range(75_000)]
    subset = pd.DataFrame({"image_id": [f"p{i}" for i in range(len(photos))], "image_path": photos,
                           "kind": "single", "split": ["val" if i % 7 == 0 else "train" for i in range(len(photos))],
                           "boxes": '[{"bbox": [1, 2, 3, 4]}]'})
    samples = [(p, None) for p in photos]
    items = {i.name: i for i in check_stage_stores(cfg, subset, 4, samples)}
    assert items["pixel_cache"].ok and "75000 to decode = 3.32 GB more" in items["pixel_cache"].detail
    detector = items["detector_store"]
    assert not detector.ok and "60000 samples, 0 already cached, 60000 to decode = 73.73 GB more" in detector.detail
    assert "+ 3.32 GB for the classifier's rows" in detector.detail and "does NOT fit" in detector.detail
    cfg.detection.enabled = False
    assert [i.name for i in check_stage_stores(cfg, subset, 4, samples)] == ["pixel_cache"]
