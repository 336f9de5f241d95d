"""Data preparation's shards through Prefect: a local Dask cluster of 2 worker processes gives the manifest,
validation report and cached pixels of the single-process path; a failing shard is named while the others finish,
and a re-run redoes only it."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from flows.data import ShardsFailed, data_flow
from pillsnap.config import load_config
from pillsnap.data import shards as shards_module
from pillsnap.data.manifest import read_manifest
from pillsnap.data.prepare import data_dir, manifest_path, pixel_store, run_import

pytestmark = pytest.mark.integration


def _outputs(overrides):
    cfg = load_config(profile="ci", overrides=overrides)
    report = json.loads((data_dir(cfg) / "validation_report.json").read_text())
    store = pixel_store(cfg)
    pixels = {key: store.get(row) for key, row in zip(store.keys, range(len(store)))}
    return manifest_path(cfg).read_text(), report, pixels


def test_shards_on_two_dask_workers_equal_the_single_process_path(prefect_harness, tiny_aihub, tmp_path):
    def overrides(name, *more):
        return [f"paths.exp_dir={tmp_path / name}", f"synth.out_dir={tiny_aihub}", f"paths.data_root={tiny_aihub}",
                "data.include_combination_crops=true", *more]

    local = data_flow(profile="ci", overrides=overrides("local"))
    dask = data_flow(profile="ci", overrides=overrides("dask", "orchestration.task_runner=dask",
                                                       "orchestration.dask_workers=2"))
    for step in ("imported", "validation"):
        shards = dask[step]["shards"]
        assert shards["total"] == local[step]["shards"]["total"] >= 3 and shards["computed"] == shards["total"]
    workers = {s["worker"] for s in _shard_summaries(overrides("dask"))}
    assert workers and str(os.getpid()) not in {w.split(":")[-1] for w in workers}  # not in this process
    manifest_a, report_a, pixels_a = _outputs(overrides("local"))
    manifest_b, report_b, pixels_b = _outputs(overrides("dask"))
    assert manifest_a == manifest_b and report_a == report_b
    assert pixels_a.keys() == pixels_b.keys() and len(pixels_a) > 60
    assert all((a is None and b is None) or np.array_equal(a, b) for a, b in
               ((pixels_a[k], pixels_b[k]) for k in pixels_a))


def _shard_summaries(overrides):
    cfg = load_config(profile="ci", overrides=overrides)
    return [json.loads(p.read_text()) for p in sorted((data_dir(cfg) / "shards").glob("validate-*.json"))]


def test_a_failing_shard_is_named_and_a_rerun_redoes_only_it(prefect_harness, flow_overrides, monkeypatch):
    victim_index = 30
    real = shards_module.inspect_photo
    cfg = load_config(profile="ci", overrides=flow_overrides)

    def inspect(photo, settings):
        if photo.path == victim:
            raise MemoryError("cannot allocate 3.7 MB")
        return real(photo, settings)

    run_import(cfg, show_progress=False)
    victim = read_manifest(manifest_path(cfg))["image_path"].iloc[victim_index]
    monkeypatch.setattr(shards_module, "inspect_photo", inspect)
    with pytest.raises(ShardsFailed, match=rf"1 of 4 shards of validate-shard failed[\s\S]*shard 1 \(manifest rows 20-39\): "
                                           rf"{victim}: MemoryError"):
        data_flow(profile="ci", overrides=flow_overrides)
    finished = sorted(Path(data_dir(cfg) / "shards").glob("validate-*.json"))
    assert len(finished) == 3  # the other shards finished
    monkeypatch.setattr(shards_module, "inspect_photo", real)
    again = data_flow(profile="ci", overrides=flow_overrides)["validation"]
    assert again["shards"] == {"total": 4, "computed": 1}
    # Prefect still holds every shard's result, but someone deleted one shard's file: that shard is redone (a
    # threshold of the report changed, so the report is built again from the shards; the shards keep their keys)
    finished[0].unlink()
    rebuilt = data_flow(profile="ci", overrides=[*flow_overrides, "data.validation.max_corrupt_fraction=0.02"])
    assert rebuilt["validation"]["shards"] == {"total": 4, "computed": 1}
