"""Data preparation in shards: one decode gives the validation report AND the pixel cache the two separate passes
gave; a finished shard is never redone; a shard that breaks names its photo; the store adopts shard rows."""
import json

import numpy as np
import pandas as pd
import pytest

from pillsnap.data import shards as shards_module
from pillsnap.data.cache import PixelStore, decode_sample, photo_samples, row_bytes, sample_keys
from pillsnap.data.class_map import build_class_map
from pillsnap.data.datasets import classification_samples
from pillsnap.data.manifest import write_manifest
from pillsnap.data.detector_store import DetectorStore, fit_long_side
from pillsnap.data.prepare import cache_root, manifest_path, pixel_store, run_validation, shard_results_dir
from pillsnap.data.shards import ShardError, ShardSettings, plan_shards, run_shard
from pillsnap.data.validate import validate_manifest

LENIENT = ["data.validation.max_corrupt_fraction=1", "data.validation.max_missing_fraction=1",
           "data.validation.max_bbox_error_fraction=1", "data.validation.max_duplicate_fraction=1"]


def _experiment(make_config, tmp_path, manifest, *overrides):
    cfg = make_config(tmp_path, *LENIENT, "data.prepare.shard_size=7", "data.include_combination_crops=true",
                      "classification.crop_padding=0.1", *overrides)
    write_manifest(manifest, manifest_path(cfg))
    return cfg


def test_one_decode_gives_the_report_and_the_cache_of_the_two_passes(broken, make_config, tmp_path):
    manifest, issues, bad = broken
    cfg = _experiment(make_config, tmp_path, manifest)
    result = run_validation(cfg, show_progress=False)
    assert result["shards"]["total"] == -(-len(manifest) // 7) and result["shards"]["computed"] == result["shards"]["total"]
    # the report of the separate validation pass (its own decode, in this process)
    report = json.loads((manifest_path(cfg).parent / "validation_report.json").read_text())
    alone = validate_manifest(manifest, cfg.data.validation)
    assert report["findings"] == alone.to_dict()["findings"] and report["quarantine"] == alone.quarantine
    assert report["duplicates_across_splits"] == [list(p) for p in alone.duplicates_across_splits]
    # the rows of the separate cache pass (decode_sample), for singles and combination crops alike
    data = classification_samples(manifest, build_class_map(manifest), include_crops=True, padding=0.1)
    store = pixel_store(cfg)
    rows = store.rows(data.samples)
    assert (rows >= 0).all() and result["pixel_cache"]["rows_added"] == len(set(data.samples))
    assert not (store.dir / "pixels.u8").exists()  # adopted by reference: no copy into the main file
    unreadable = {p for p in manifest.image_path if any(s in p for s in (bad["truncated"], bad["empty"], bad["text"]))}
    for (path, box), row in zip(data.samples, rows):
        if path in unreadable:
            assert not store.has(int(row))
        else:
            assert np.array_equal(store.get(int(row)), decode_sample(path, box, cfg.classification.image_size, 0.1))
    # training finds every row: nothing is decoded again
    assert store.ensure(data.samples, show_progress=False).tolist() == rows.tolist()
    assert not (store.dir / "pixels.u8").exists()
    # the same decode fitted every combination photo into the detector's store, as ultralytics reads and resizes it
    combos = manifest[manifest.kind == "combination"].image_path.tolist()
    detector = DetectorStore(cache_root(cfg), cfg.detection.image_size)
    assert len(combos) >= 3 and result["pixel_cache"]["detector_rows_added"] == len(detector) == len(combos)
    fitted = detector.rows([(p, None) for p in combos])
    for path, row in zip(combos, fitted):
        assert np.array_equal(detector.get(int(row)), fit_long_side(path, None, cfg.detection.image_size)), path
    assert detector.ensure([(p, None) for p in combos], show_progress=False).tolist() == fitted.tolist()
    assert not (detector.dir / "pixels.u8").exists()


def test_a_photo_that_is_not_an_rgb_png_is_fitted_as_opencv_decodes_it(tiny_manifest, tmp_path):
    """Pillow's pixels stand in for OpenCV's only where both decoders must agree (8-bit RGB PNG): a JPEG's row is
    OpenCV's own decode, like ultralytics' imread."""
    from PIL import Image

    from pillsnap.core.identity import file_stamp
    from pillsnap.data.shards import Photo, inspect_photo

    png = tiny_manifest[tiny_manifest.kind == "combination"].iloc[0]
    jpeg = tmp_path / "photo.jpg"
    Image.open(png.image_path).convert("RGB").save(jpeg, quality=80)
    settings = ShardSettings(True, False, str(tmp_path / "cache"), 64, 0.0, True, detector_size=96)
    for path in (png.image_path, str(jpeg)):
        photo = Photo(path, int(png.width), int(png.height), (), file_stamp(path), combination=True)
        inspected = inspect_photo(photo, settings)
        assert inspected.check[0] is None
        np.testing.assert_array_equal(inspected.detector_row, fit_long_side(path, None, 96))
    single = Photo(png.image_path, int(png.width), int(png.height), (), file_stamp(png.image_path))
    assert inspect_photo(single, settings).detector_row is None


def test_a_finished_shard_is_not_redone_and_an_unfinished_one_is(broken, make_config, tmp_path):
    cfg = _experiment(make_config, tmp_path, broken[0])
    run_validation(cfg, show_progress=False)
    results = sorted(shard_results_dir(cfg).glob("validate-*.json"))
    store = pixel_store(cfg)
    segments = sorted(store.dir.glob("seg-*.npz"))
    results[1].unlink()  # a crash after shard 1 wrote its rows, before its result
    segments[2].unlink()  # a crash before shard 2 committed its rows
    again = run_validation(cfg, show_progress=False)
    assert again["shards"]["computed"] == 2 and again["pixel_cache"]["rows_added"] == 0
    assert again["findings"] == json.loads((manifest_path(cfg).parent / "validation_report.json").read_text())[
        "finding_counts"]


def test_a_photo_that_breaks_the_shard_is_named(broken, make_config, tmp_path, monkeypatch):
    cfg = _experiment(make_config, tmp_path, broken[0])
    victim = broken[0].image_path.iloc[9]
    real = shards_module.inspect_photo

    def inspect(photo, settings):
        if photo.path == victim:
            raise MemoryError("cannot allocate 3.7 MB")
        return real(photo, settings)

    monkeypatch.setattr(shards_module, "inspect_photo", inspect)
    with pytest.raises(ShardError, match=rf"shard 1 \(manifest rows 7-13\): {victim}: MemoryError"):
        run_validation(cfg, show_progress=False)


def test_settings_and_photos_name_a_shard():
    manifest = pd.DataFrame({"image_path": [f"/d/{i}.png" for i in range(10)], "kind": ["single"] * 10,
                             "boxes": ["[]"] * 10, "width": [976] * 10, "height": [1280] * 10})
    settings = ShardSettings(True, True, "/cache", 384, 0.0, False)
    keys = [s.key for s in plan_shards(manifest, settings, 4)]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert [s.key for s in plan_shards(manifest, settings, 4)] == keys  # stable: a re-run finds them
    other = ShardSettings(True, True, "/cache", 320, 0.0, False)
    assert not set(keys) & {s.key for s in plan_shards(manifest, other, 4)}  # another cache size: other shards
    fitting = ShardSettings(True, True, "/cache", 384, 0.0, False, detector_size=640)
    assert not set(keys) & {s.key for s in plan_shards(manifest, fitting, 4)}  # the detector store filled too
    changed = manifest.assign(width=[976] * 9 + [977])
    assert [s.key for s in plan_shards(changed, settings, 4)][:2] == keys[:2]  # only the changed shard differs
    assert plan_shards(changed, settings, 4)[2].key != keys[2]


def test_stage_4_is_a_few_hundred_shards():
    """Stage 4's 500K photos at the shipped 3,000 per shard: 167 task runs, not 500K (the release's 2.47M: 824)."""
    n = 500_000
    manifest = pd.DataFrame({"image_path": [f"/d/{i}.png" for i in range(n)], "kind": "single", "boxes": "[]",
                             "width": 976, "height": 1280})
    shards = plan_shards(manifest, ShardSettings(True, True, None, 384, 0.0, False), 3000)
    assert len(shards) == 167 and sum(len(s.photos) for s in shards) == n and len({s.key for s in shards}) == 167
    assert shards[-1].describe() == "shard 166 (manifest rows 498000-499999)"


def test_the_cache_is_left_to_training_when_the_disk_cannot_hold_the_manifest(broken, make_config, tmp_path,
                                                                                  monkeypatch):
    import shutil

    from pillsnap.data import cache

    cfg = _experiment(make_config, tmp_path, broken[0])
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    result = run_validation(cfg, show_progress=False)
    assert "cannot hold" in result["pixel_cache"]["note"] and result["pixel_cache"]["rows_added"] == 0
    assert not list(pixel_store(cfg).dir.glob("seg-*")) and result["pixel_cache"]["detector_rows_added"] == 0


def test_the_detector_rows_are_left_to_training_when_the_disk_holds_only_the_classifiers(broken, make_config,
                                                                                          tmp_path, monkeypatch):
    import shutil

    from pillsnap.data import cache

    cfg = _experiment(make_config, tmp_path, broken[0])
    samples = [s for p, k, b in zip(*(broken[0][c] for c in ("image_path", "kind", "boxes")))
               for s in photo_samples(p, k, b, True)]
    # room for the classifier's rows and one detector row
    free = pixel_store(cfg).plan(samples).bytes_needed + cache.DISK_MARGIN_BYTES + row_bytes(cfg.detection.image_size)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    result = run_validation(cfg, show_progress=False)
    assert result["pixel_cache"]["rows_added"] > 0 and result["pixel_cache"]["detector_rows_added"] == 0
    assert "left to each stage's training" in result["pixel_cache"]["note"]
    assert not DetectorStore(cache_root(cfg), cfg.detection.image_size).dir.exists()


def test_photo_samples_are_the_classifier_samples(tiny_manifest):
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True)
    mine = [s for p, k, b in zip(tiny_manifest.image_path, tiny_manifest.kind, tiny_manifest.boxes)
            for s in photo_samples(p, k, b, True)]
    assert sample_keys(mine) == sample_keys(data.samples)


def test_an_index_from_before_segments_still_reads(tiny_manifest, tmp_path):
    samples = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples[:5]
    store = PixelStore(tmp_path, 16)
    rows = store.ensure(samples, show_progress=False)
    with np.load(store.index_path) as z:
        keys, valid = z["keys"], z["valid"]
    np.savez(store.index_path, keys=keys, valid=valid)  # the old format: no segment / offset columns
    old = PixelStore(tmp_path, 16)
    assert np.array_equal(old.get(int(rows[3])), decode_sample(samples[3][0], None, 16))
    more = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples[:8]
    old.ensure(more, show_progress=False)  # appends after the old rows, keeps them
    assert (store.data_path.stat().st_size == 8 * row_bytes(16)
            and np.array_equal(PixelStore(tmp_path, 16).get(7), decode_sample(more[7][0], None, 16)))


def test_a_shard_writes_nothing_that_is_read_until_it_commits(broken, tmp_path):
    manifest = broken[0]
    settings = ShardSettings(True, True, str(tmp_path / "cache"), 16, 0.0, False)
    shard = plan_shards(manifest[manifest.kind == "single"].iloc[10:15], settings, 5)[0]
    with pytest.raises(FileNotFoundError, match="not committed"):
        PixelStore(tmp_path / "cache", 16).adopt([shard.segment])
    first = run_shard(shard, settings, tmp_path / "results")
    assert first["computed"] and not run_shard(shard, settings, tmp_path / "results")["computed"]
    assert PixelStore(tmp_path / "cache", 16).adopt([shard.segment]) == 5
    assert PixelStore(tmp_path / "cache", 16).adopt([shard.segment]) == 0  # a second adoption adds nothing


def test_a_photo_truncated_after_validation_fails_the_next_validation_and_loses_its_pixels(tiny_aihub, make_config,
                                                                                           tmp_path):
    """Issue 28, reproduction 3: shards keyed by path and size said PASS after a photo was truncated, and the pixel
    store kept serving its old pixels. Now a shard is keyed by its files' stamps: the re-run inspects the changed
    photo (1 of 66 unreadable = 1.5 % > the shipped 1 %: FAIL) and the store's rows are keyed by the stamp too."""
    import shutil

    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.manifest import assign_splits
    from pillsnap.data.validate import DataValidationError

    root = tmp_path / "aihub"
    shutil.copytree(tiny_aihub / "train", root / "train")
    manifest = assign_splits(import_aihub(root, show_progress=False).manifest, 0.2, 0)
    cfg = make_config(tmp_path, "data.prepare.shard_size=7")  # the shipped validation thresholds
    write_manifest(manifest, manifest_path(cfg))
    assert run_validation(cfg, show_progress=False)["shards"]["computed"] > 1  # PASS: nothing raised
    victim = manifest[manifest.kind == "single"].image_path.iloc[3]
    sample = [(victim, None)]
    store = pixel_store(cfg)
    assert store.has(int(store.rows(sample)[0]))
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])

    with pytest.raises(DataValidationError, match="unreadable"):
        run_validation(cfg, show_progress=False)
    again = json.loads((manifest_path(cfg).parent / "validation_report.json").read_text())
    assert [f["path"] for f in again["findings"] if f["kind"] == "unreadable_image"] == [victim]
    assert not pixel_store(cfg).has(int(pixel_store(cfg).rows(sample)[0]))  # the truncated file's row, not the old one
