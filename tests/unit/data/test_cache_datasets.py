"""The pixel store equals a fresh decode, is shared by every stage, fits the disk or says so; bad samples are
skipped and counted; the sampler resumes exactly."""
import numpy as np
import pytest
import torch

from pillsnap.data.cache import CacheSpaceError, PixelStore, decode_sample, row_bytes
from pillsnap.data.class_map import build_class_map
from pillsnap.data.datasets import ClassificationDataset, Collate, EpochSampler, SkipCounter, classification_samples


def test_stored_pixels_equal_a_fresh_decode(tiny_manifest, tmp_path):
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True, padding=0.1)
    store = PixelStore(tmp_path, 40, 0.1)
    rows = store.ensure(data.samples, workers=2, show_progress=False)
    assert store.valid.all() and len(store) == len(set(data.samples)) and (rows >= 0).all()
    crops = [i for i, (_, box) in enumerate(data.samples) if box is not None]
    for i in [0, len(data.samples) // 2, crops[0], crops[-1]]:
        path, box = data.samples[i]
        assert np.array_equal(store.get(int(rows[i])), decode_sample(path, box, 40, 0.1))


def test_one_store_serves_every_stage_and_decodes_each_photo_once(tiny_manifest, tmp_path):
    samples = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples
    stage_1, stage_2 = samples[:20], samples[10:40]  # nested stages share photos
    store = PixelStore(tmp_path, 32)
    first = store.ensure(stage_1, show_progress=False)
    size_after_stage_1 = (store.dir / "pixels.u8").stat().st_size
    second = PixelStore(tmp_path, 32).ensure(stage_2, show_progress=False)  # a later process, a later stage
    reopened = PixelStore(tmp_path, 32)
    assert len(reopened) == 40 and (store.dir / "pixels.u8").stat().st_size == size_after_stage_1 + 20 * row_bytes(32)
    assert list(second[:10]) == list(first[10:])  # the shared photos keep their rows: not decoded again
    assert reopened.plan(samples[:40]).missing == 0 and reopened.plan(samples).missing == len(samples) - 40
    assert len(list(tmp_path.glob("*"))) == 1  # one store for (size, padding), not one per stage


def test_an_uncommitted_tail_is_dropped_and_rebuilt(tiny_manifest, tmp_path):
    samples = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples[:6]
    store = PixelStore(tmp_path, 16)
    store.ensure(samples[:3], show_progress=False)
    with open(store.data_path, "ab") as f:  # a crash after appending rows, before the index was committed
        f.write(b"\x07" * row_bytes(16) * 2)
    rows = PixelStore(tmp_path, 16).ensure(samples, show_progress=False)
    again = PixelStore(tmp_path, 16)
    assert len(again) == 6 and store.data_path.stat().st_size == 6 * row_bytes(16)
    assert np.array_equal(again.get(int(rows[4])), decode_sample(samples[4][0], None, 16))


def test_a_store_that_does_not_fit_stops_before_decoding_with_the_numbers(tiny_manifest, tmp_path, monkeypatch):
    samples = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 10_000_000})())
    store = PixelStore(tmp_path, 384)
    plan = store.plan(samples)
    assert not plan.fits and plan.bytes_needed == len(set(samples)) * 384 * 384 * 3
    with pytest.raises(CacheSpaceError, match=r"to decode = .* GB more .* free 0.01 GB"):
        store.ensure(samples, show_progress=False)
    assert not store.index_path.exists()


def test_unreadable_sample_is_skipped_and_counted(tiny_manifest, tmp_path):
    cmap = build_class_map(tiny_manifest)
    rows = tiny_manifest[tiny_manifest.kind == "single"].head(4).copy()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.iloc[1, rows.columns.get_loc("image_path")] = str(bad)
    data = classification_samples(rows, cmap)
    store = PixelStore(tmp_path / "c", 32)
    for kwargs in ({}, {"store": store, "rows": store.ensure(data.samples, show_progress=False)}):
        ds = ClassificationDataset(data, 32, **kwargs)
        before = SkipCounter.skipped
        batch = Collate()([ds[i] for i in range(4)])
        assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["indices"].tolist() == [0, 2, 3] and SkipCounter.skipped == before + 1
    assert Collate()([None, None]) is None


def test_single_photos_carry_their_pill_box_and_crops_a_centred_one(tiny_manifest):
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True, padding=0.15)
    single = next(i for i, (_, box) in enumerate(data.samples) if box is None)
    crop = next(i for i, (_, box) in enumerate(data.samples) if box is not None)
    cx, cy, w, h = data.pill_boxes[single]
    assert 0 < w < 1 and 0 < h < 1 and w / 2 <= cx <= 1 - w / 2
    cx, cy, w, h = data.pill_boxes[crop]
    assert abs(cx - 0.5) < 0.1 and 0.7 < w < 0.9  # 1 / (1 + 2 x 0.15) of the crop, unless clipped at a border


def test_epoch_sampler_resumes_mid_epoch_with_the_same_augmentation_seeds():
    full = list(EpochSampler(20, seed=3).__iter__())
    s = EpochSampler(20, seed=3)
    s.set_epoch(0, start_sample=8)
    assert list(s) == full[8:] and len(s) == 12
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new permutation each epoch
    weighted = EpochSampler(1000, seed=1, weights=torch.tensor([1.0] * 500 + [0.0] * 500, dtype=torch.float64))
    assert max(i for i, _ in weighted) < 500
    plain = EpochSampler(20, seed=3, with_seeds=False)
    assert list(plain) == [i for i, _ in full]


def test_reading_every_row_does_not_grow_the_process_memory(tmp_path):
    """A memory-mapped store counts every page read as the process's own memory: over an epoch of a 74 GB detector
    store that reads as a leak of that size to the memory check (Stage 3 of the production path failed on it). The
    rows are read with pread, into arrays that are freed: the pages stay in the kernel's page cache."""
    import psutil

    from pillsnap.data.cache import commit_segment, segment_rows

    rows, store = 160, PixelStore(tmp_path, 640)  # 160 x 640 x 640 x 3 = 197 MB
    out = segment_rows(store.dir, "seg-x", rows, 640)
    out[:] = 7
    out.flush()
    del out
    commit_segment(store.dir, "seg-x", [bytes([i % 256, i // 256]) * 10 for i in range(rows)], np.ones(rows, bool))
    assert store.adopt(["seg-x"]) == rows
    process = psutil.Process()
    before = process.memory_full_info().uss
    for _ in range(2):
        for row in range(rows):
            assert store.get(row)[0, 0, 0] == 7
    assert process.memory_full_info().uss - before < 50 * 2**20
