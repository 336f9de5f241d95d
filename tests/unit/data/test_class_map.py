"""ONE global class map, used by every split and stage (the earlier implementation's ~0 % val accuracy)."""
import json

import pytest

from pillsnap.data.class_map import ClassMap, ClassMapError, build_class_map, check_same
from pillsnap.data.datasets import classification_samples


def test_class_map_is_sorted_and_covers_every_pill(tiny_manifest):
    cmap = build_class_map(tiny_manifest)
    assert cmap.k_codes == sorted(cmap.k_codes)
    assert [cmap.index[k] for k in cmap.k_codes] == list(range(len(cmap)))
    combo_codes = {b["k_code"] for s in tiny_manifest.loc[tiny_manifest.kind == "combination", "boxes"]
                   for b in json.loads(s)}
    assert combo_codes <= set(cmap.index)


def test_train_and_val_share_the_same_labels(tiny_manifest):
    cmap = build_class_map(tiny_manifest)
    train = tiny_manifest[tiny_manifest.split == "train"]
    val = tiny_manifest[tiny_manifest.split == "val"]
    # Val alone would build a map over fewer classes if some were missing; the shared map must not care.
    val_alone = ClassMap.from_codes(val.loc[val.kind == "single", "k_code"].iloc[:5])
    for rows in (train, val):
        data = classification_samples(rows, cmap, include_crops=False)
        codes = list(rows.loc[rows.kind == "single", "k_code"])
        assert data.labels == [cmap.index[k] for k in codes]
        crops = classification_samples(rows[rows.kind == "combination"], cmap, include_crops=True)
        pills = [b["k_code"] for s in rows.loc[rows.kind == "combination", "boxes"] for b in json.loads(s)]
        assert crops.labels == [cmap.index[k] for k in pills]
    assert val_alone.hash != cmap.hash


def test_save_load_and_mismatch_is_an_error(tmp_path, tiny_manifest):
    cmap = build_class_map(tiny_manifest, {"K-000001": {"drug_name": "약", "edi_codes": ["643900680"]}})
    loaded = ClassMap.load(cmap.save(tmp_path / "class_map.json"))
    assert loaded.hash == cmap.hash and loaded.names["K-000001"] == "약"
    assert loaded.info["K-000001"]["edi_codes"] == ["643900680"] and loaded.restrict(["K-000001"]).info == cmap.info
    other = ClassMap.from_codes(cmap.k_codes[:-1])
    with pytest.raises(ClassMapError, match="refusing to remap"):
        check_same(cmap.hash, other, "checkpoint best.pt")
    tampered = json.loads((tmp_path / "class_map.json").read_text())
    tampered["classes"] = {k: (v + 1) % len(cmap) for k, v in tampered["classes"].items()}
    (tmp_path / "bad.json").write_text(json.dumps(tampered))
    with pytest.raises(ClassMapError, match="sorted K-code order"):
        ClassMap.load(tmp_path / "bad.json")


def test_restrict_is_a_sorted_sub_map(tiny_manifest):
    cmap = build_class_map(tiny_manifest)
    sub = cmap.restrict(cmap.k_codes[3:] + cmap.k_codes[:1])
    assert sub.k_codes == sorted(sub.k_codes) and len(sub) == len(cmap) - 2
    with pytest.raises(ClassMapError, match="K-999999"):
        cmap.restrict(["K-999999"])
