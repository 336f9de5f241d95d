"""The pixel store's row formats: JPEG rows are close to raw and far smaller; `auto` picks raw only while the rows
stay in RAM, picks JPEG at the release's size, and is decided once per experiment."""
import numpy as np
import pytest

from pillsnap.config.schema import ConfigError
from pillsnap.data.cache import PixelStore, decode_sample, row_bytes
from pillsnap.data.class_map import build_class_map
from pillsnap.data.datasets import classification_samples
from pillsnap.data.manifest import write_manifest
from pillsnap.data.prepare import manifest_path, pixel_store, run_validation, store_format, store_format_path
from pillsnap.data.row_format import RAW, RowFormat, choose_format

GB = 10**9
JPEG = RowFormat("jpeg", 90)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """A JPEG row at quality 90 against the raw row: the same picture (PSNR above 35 dB)."""
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return a.shape == b.shape and 10 * np.log10(255**2 / max(mse, 1e-9)) > 35


def test_jpeg_rows_are_the_raw_pixels_within_compression_and_far_smaller(tiny_manifest, tmp_path):
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True, padding=0.1)
    store = PixelStore(tmp_path, 64, 0.1, JPEG)
    rows = store.ensure(data.samples, workers=2, show_progress=False)
    assert store.dir.name == "px64_pad0.1_jpeg90" and store.data_path.name == "pixels.jpg" and (rows >= 0).all()
    for i in range(0, len(data.samples), 7):
        path, box = data.samples[i]
        assert _close(store.get(int(rows[i])), decode_sample(path, box, 64, 0.1))
    assert store.data_path.stat().st_size == store.bytes_on_disk() < len(store) * row_bytes(64) / 5
    reopened = PixelStore(tmp_path, 64, 0.1, JPEG)  # another process: the index gives offsets and lengths
    assert np.array_equal(reopened.get(int(rows[3])), store.get(int(rows[3])))
    assert not PixelStore(tmp_path, 64, 0.1).rows(data.samples[:1])[0] >= 0  # the raw store is another store


def test_a_jpeg_store_drops_an_uncommitted_tail(tiny_manifest, tmp_path):
    samples = classification_samples(tiny_manifest, build_class_map(tiny_manifest)).samples[:6]
    store = PixelStore(tmp_path, 32, 0.0, JPEG)
    store.ensure(samples[:3], show_progress=False)
    with open(store.data_path, "ab") as f:  # a crash after appending rows, before the index was committed
        f.write(b"\x07" * 5000)
    rows = PixelStore(tmp_path, 32, 0.0, JPEG).ensure(samples, show_progress=False)
    again = PixelStore(tmp_path, 32, 0.0, JPEG)
    assert len(again) == 6 and store.data_path.stat().st_size == again.bytes_on_disk()
    assert all(np.array_equal(again.get(int(r)), JPEG.decode(JPEG.encode(decode_sample(p, None, 32)), 32))
               for r, (p, _) in zip(rows, samples))


def test_validation_fills_a_jpeg_store_that_training_reads(tiny_manifest, make_config, tmp_path):
    cfg = make_config(tmp_path, "dataloader.cache.format=jpeg", "dataloader.cache.jpeg_quality=85",
                      "data.prepare.shard_size=9", "data.include_combination_crops=true")
    write_manifest(tiny_manifest, manifest_path(cfg))
    result = run_validation(cfg, show_progress=False)
    pad = cfg.classification.crop_padding
    data = classification_samples(tiny_manifest, build_class_map(tiny_manifest), include_crops=True, padding=pad)
    store = pixel_store(cfg)
    rows = store.rows(data.samples)
    assert store.fmt == RowFormat("jpeg", 85) and result["pixel_cache"]["rows_added"] == len(set(data.samples))
    assert (rows >= 0).all() and len(list(store.dir.glob("seg-*.jpg"))) == result["shards"]["total"]
    size = cfg.classification.image_size
    for r, (p, b) in zip(rows, data.samples):  # exactly the fresh decode's row, encoded once
        fresh = decode_sample(p, b, size, pad)
        assert np.array_equal(store.get(int(r)), store.fmt.decode(store.fmt.encode(fresh), size))
    assert store.ensure(data.samples, show_progress=False).tolist() == rows.tolist()  # nothing decoded again


def test_auto_keeps_raw_rows_only_while_they_fit_in_half_the_ram():
    fmt, why = choose_format("auto", 90, 10_000, 384, 128 * GB, 1000 * GB)
    assert fmt == RAW and "raw 4.4 GB" in why
    # the release on the specification's 128 GB workstation: 2.5M rows are 1.09 TB raw
    fmt, why = choose_format("auto", 90, 2_520_000, 384, 128 * GB, 4000 * GB)
    assert fmt == JPEG and "raw 1114.8 GB, RAM 128.0 GB" in why
    assert choose_format("auto", 95, 10_000, 384, 128 * GB, 3 * GB)[0] == RowFormat("jpeg", 95)  # the disk is small
    assert choose_format("raw", 90, 2_520_000, 384, 1, 1) == (RAW, "dataloader.cache.format=raw")
    with pytest.raises(ValueError, match="dataloader.cache.format='png'"):
        choose_format("png", 90, 1, 384, 1, 1)


def test_auto_is_decided_once_per_experiment(tiny_manifest, make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    write_manifest(tiny_manifest, manifest_path(cfg))
    assert cfg.dataloader.cache.format == "auto"
    first, why = store_format(cfg, ram_bytes=1, free_bytes=1000 * GB)  # a machine whose RAM holds nothing
    assert first == JPEG and store_format_path(cfg).is_file()
    again, why_again = store_format(cfg, ram_bytes=1000 * GB)  # a node with more RAM reads the same store
    assert again == first and "recorded in" in why_again and pixel_store(cfg).fmt == JPEG


def test_bad_store_settings_are_refused_naming_the_key(make_config, tmp_path):
    with pytest.raises(ConfigError, match="dataloader.cache.format='webp'"):
        make_config(tmp_path, "dataloader.cache.format=webp")
    with pytest.raises(ConfigError, match=r"dataloader.cache.jpeg_quality=20 must be in \[50, 100\]"):
        make_config(tmp_path, "dataloader.cache.jpeg_quality=20")
