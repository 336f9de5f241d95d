"""The detector's decode-once store: ultralytics' load_image from it gives the very pixels of its own PNG read and
resize, every augmented training sample is the same sample, the photos are decoded once for every stage, and
nothing is decoded while training reads it."""
import numpy as np

from pillsnap.data.detector_store import DetectorStore, StoredImages, fitted_shape
from pillsnap.train.data import SeededItems, detector_data
from pillsnap.train.units.detector import detector_hyperparameters


def _data(make_config, tmp, manifest, *overrides):
    cfg = make_config(tmp, "detection.include_single_images=true", *overrides)
    return detector_data(cfg, manifest, 1, detector_hyperparameters(cfg), 3, show_progress=False).train.dataset


def test_stored_photos_are_ultralytics_own_and_every_augmented_sample_is_the_same(make_config, tmp_path,
                                                                                  tiny_manifest, monkeypatch):
    manifest = tiny_manifest
    stored = _data(make_config, tmp_path / "store", manifest)
    plain = _data(make_config, tmp_path / "plain", manifest, "dataloader.cache.enabled=false")
    assert isinstance(stored.load_image, StoredImages) and "load_image" not in vars(plain)
    assert stored.load_image.store.dir.name == f"det{stored.imgsz}_pad0"
    for i in range(len(stored)):
        ours, theirs = stored.load_image(i), plain.load_image(i)
        assert np.array_equal(ours[0], theirs[0]) and ours[1:] == theirs[1:], i
    # another process, a later stage: the same rows, none decoded again; and drawing samples (mosaic partners
    # included) reads no photo
    fresh = _data(make_config, tmp_path / "store", manifest)
    assert len(fresh.load_image.store) == len(stored.load_image.store) == len(stored)
    import ultralytics.data.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("a photo was decoded while training read the store")
    ours, theirs = SeededItems(fresh), SeededItems(plain)
    for index, seed in [(0, 11), (3, 12), (len(fresh) - 1, 13)]:
        with monkeypatch.context() as m:
            m.setattr(base, "imread", refuse)
            x = ours[(index, seed)]
        y = theirs[(index, seed)]
        assert np.array_equal(x["img"].numpy(), y["img"].numpy()) and np.array_equal(x["bboxes"], y["bboxes"])


def test_the_fitted_shape_is_ultralytics_rounding():
    assert fitted_shape(1280, 976, 640) == (640, 488) and fitted_shape(640, 480, 640) == (640, 480)
    assert fitted_shape(100, 50, 640) == (640, 320)


def test_an_unreadable_photo_is_left_to_ultralytics(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    store = DetectorStore(tmp_path / "cache", 64)
    rows = store.ensure([(str(bad), None)], show_progress=False)
    assert not store.has(int(rows[0]))
