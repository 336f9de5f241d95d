"""What a training run is bound to: JPEG pixel rows are other pixels than raw ones, so they join its identity."""
from pillsnap.data.manifest import write_manifest
from pillsnap.data.prepare import manifest_path
from pillsnap.train.run import data_identity


def test_jpeg_rows_join_the_data_identity_and_raw_rows_add_nothing(tiny_aihub, make_config, tmp_path):
    from pillsnap.data.aihub import import_aihub

    manifest = import_aihub(tiny_aihub, show_progress=False).manifest
    identities = {}
    for fmt in ("raw", "jpeg"):
        cfg = make_config(tmp_path / fmt, f"dataloader.cache.format={fmt}")
        write_manifest(manifest, manifest_path(cfg))
        identities[fmt] = data_identity(cfg, manifest, 1, {})
    assert "pixel_rows" not in identities["raw"] and identities["jpeg"]["pixel_rows"] == "jpeg90"
    assert identities["raw"]["subset"] == identities["jpeg"]["subset"]
