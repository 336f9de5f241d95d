"""Decode-once cache equals a fresh decode; bad samples are skipped and counted; the sampler resumes exactly."""
import numpy as np
import torch

from pillsnap.data.cache import build_cache, decode_sample
from pillsnap.data.class_map import build_class_map
from pillsnap.data.datasets import (ClassificationDataset, EpochSampler, SkipCounter, classification_samples,
                                    safe_collate)


def test_cached_pixels_equal_a_fresh_decode(tiny_manifest, tmp_path):
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True)
    cache = build_cache(data.samples, 40, tmp_path, padding=0.1, workers=2, show_progress=False)
    assert cache.valid.all() and len(cache) == len(data.samples)
    crops = [i for i, (_, box) in enumerate(data.samples) if box is not None]
    for i in [0, len(data.samples) // 2, crops[0], crops[-1]]:
        path, box = data.samples[i]
        assert np.array_equal(cache.get(i), decode_sample(path, box, 40, 0.1))
    again = build_cache(data.samples, 40, tmp_path, padding=0.1, show_progress=False)  # reused, not rebuilt
    assert again.path == cache.path and len(list(tmp_path.glob("*.u8"))) == 1


def test_unreadable_sample_is_skipped_and_counted(tiny_manifest, tmp_path):
    cmap = build_class_map(tiny_manifest)
    rows = tiny_manifest[tiny_manifest.kind == "single"].head(4).copy()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.iloc[1, rows.columns.get_loc("image_path")] = str(bad)
    data = classification_samples(rows, cmap)
    for cache in (None, build_cache(data.samples, 32, tmp_path / "c", show_progress=False)):
        ds = ClassificationDataset(data, 32, train=False, cache=cache)
        before = SkipCounter.skipped
        images, labels, index = safe_collate([ds[i] for i in range(4)])
        assert images.shape == (3, 3, 32, 32) and index.tolist() == [0, 2, 3]
        assert SkipCounter.skipped == before + 1
    assert safe_collate([None, None]) is None


def test_epoch_sampler_resumes_mid_epoch_with_the_same_augmentation_seeds():
    full = list(EpochSampler(20, seed=3).__iter__())
    s = EpochSampler(20, seed=3)
    s.set_epoch(0, start_sample=8)
    assert list(s) == full[8:] and len(s) == 12
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new permutation each epoch
    weighted = EpochSampler(1000, seed=1, weights=torch.tensor([1.0] * 500 + [0.0] * 500, dtype=torch.float64))
    assert max(i for i, _ in weighted) < 500
