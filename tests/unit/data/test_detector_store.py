"""The detector's decode-once store: ultralytics' load_image from it gives the very pixels of its own PNG read and
resize, every augmented training sample is the same sample, the photos are decoded once for every stage, and
nothing is decoded while training reads it."""
import numpy as np
import pytest

from pillsnap.data.detector_store import DetectorStore, StoredImages, fitted_shape
from pillsnap.train.data import SeededItems, detector_data
from pillsnap.train.units.detector import detector_hyperparameters


def _detector_data(make_config, tmp, manifest, *overrides):
    cfg = make_config(tmp, "detection.include_single_images=true", *overrides)
    return detector_data(cfg, manifest, 1, detector_hyperparameters(cfg), 3, show_progress=False)


def _data(make_config, tmp, manifest, *overrides):
    return _detector_data(make_config, tmp, manifest, *overrides).train.dataset


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
    photos = len(stored) + len(_detector_data(make_config, tmp_path / "store", manifest).val_samples)
    assert len(fresh.load_image.store) == len(stored.load_image.store) == photos
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


def test_validation_reads_the_store_and_scores_exactly_as_from_the_photos(make_config, tmp_path, tiny_manifest,
                                                                          monkeypatch):
    """The letterboxed input from a store row is the very input from the photo, so the figures are the same; the
    store-backed validation opens no photo."""
    import cv2
    import torch

    import pillsnap.infer.detection as detection
    from pillsnap.infer.detection import FittedPhoto, evaluate_detector, letterbox, load_bgr, map_detector

    data = _detector_data(make_config, tmp_path, tiny_manifest)
    samples, read, size = data.val_samples, data.val_read, data.train.dataset.imgsz
    assert len(samples) >= 2 and read is not None
    for i, sample in enumerate(samples):
        photo = read(i)
        assert isinstance(photo, FittedPhoto)
        ours, theirs = letterbox(photo, size), letterbox(load_bgr(sample.image_path), size)
        assert np.array_equal(ours[0], theirs[0]) and ours[1] == theirs[1], i

    def fake_model(batch):  # boxes that depend on the pixels: any pixel difference changes the scores
        b = torch.as_tensor(batch)
        raw = torch.zeros(len(b), 5, 64)
        raw[:, :2] = torch.linspace(0.1, 0.9, 64) * size
        raw[:, 2:4] = size / 5
        raw[:, 4] = b.mean(dim=(1, 2)).reshape(len(b), -1)[:, :64].sigmoid()
        return raw
    detect = map_detector(fake_model, size, 2)
    from_photos = detect([load_bgr(s.image_path) for s in samples])
    on_photos = evaluate_detector(detect, samples)
    monkeypatch.setattr(detection, "load_bgr", lambda path: (_ for _ in ()).throw(AssertionError(path)))
    monkeypatch.setattr(cv2, "imread", lambda *a: (_ for _ in ()).throw(AssertionError("imread")))
    on_store = evaluate_detector(detect, samples, read=read)
    for ours, theirs in zip(detect([read(i) for i in range(len(samples))]), from_photos):
        np.testing.assert_array_equal(ours, theirs)
    assert sum(len(d) for d in from_photos) > 0
    assert on_store == on_photos and on_store["n_images"] == len(samples)
    stale = FittedPhoto(np.zeros((10, 10, 3), np.uint8), samples[0].shape)
    with pytest.raises(ValueError, match="not a"):
        letterbox(stale, size)
