"""Synthesis -> import round trip in the real AIHub layout."""
import json

import numpy as np
from PIL import Image

from pillsnap.data.aihub import import_aihub, import_aihub_test
from pillsnap.data.pill_look import kcode_for
from pillsnap.data.synth import synthesize


def test_layout_matches_the_real_dataset(tiny_aihub):
    singles = sorted((tiny_aihub / "train/images/single").glob("TS_*_single/K-*/*.png"))
    labels = sorted((tiny_aihub / "train/labels/single").glob("TL_*_single/K-*_json/*.json"))
    assert len(singles) == len(labels) == 6 * 10
    stem = singles[0].stem.split("_")
    assert len(stem) == 8 and stem[1] == "0" and stem[-1] == "200" and stem[5] in {"60", "70", "75", "90"}
    image = json.loads(labels[0].read_text())["images"][0]
    for field in ("file_name", "width", "height", "dl_mapping_code", "dl_name", "drug_shape", "color_class1",
                  "color_class2", "print_front", "print_back", "di_edi_code", "back_color", "light_color",
                  "camera_la", "camera_lo", "drug_dir", "dl_idx", "item_seq"):
        assert field in image
    combo_jsons = list((tiny_aihub / "train/labels/combination").glob("TL_1_combo/K-*_json/K-*/*.json"))
    assert combo_jsons, "combination labels live in per-K-code sub-folders"


def test_round_trip_boxes_and_kcodes(tiny_aihub):
    result = import_aihub(tiny_aihub, show_progress=False)
    m = result.manifest
    assert result.issues == []
    assert set(m["split"]) == {""}  # the split is assigned later, once
    singles, combos = m[m.kind == "single"], m[m.kind == "combination"]
    assert len(singles) == 60 and len(combos) == 3 * 2
    assert set(singles["k_code"]) == {kcode_for(i) for i in range(6)}
    for _, row in combos.iterrows():
        boxes = json.loads(row["boxes"])
        folder_codes = ["K-" + c for c in row["image_id"].split("_")[0][2:].split("-")]
        # every pill carries its OWN K-code, from its own JSON
        assert sorted(b["k_code"] for b in boxes) == sorted(folder_codes)
        with Image.open(row["image_path"]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        for b in boxes:
            x, y, w, h = (int(v) for v in b["bbox"])
            assert 0 <= x and 0 <= y and x + w <= row["width"] and y + h <= row["height"]
            inside = pixels[y:y + h, x:x + w].reshape(-1, 3)
            assert np.abs(inside - background).max(axis=1).mean() > 8, "the box must contain the drawn pill"


def test_import_never_reads_the_sealed_test_split(tiny_aihub):
    m = import_aihub(tiny_aihub, show_progress=False).manifest
    assert not any("/val/" in p for p in m["image_path"])
    test = import_aihub_test(tiny_aihub, show_progress=False).manifest
    assert set(test["split"]) == {"test"} and len(test) == 6 * 2 + 1 * 2


def test_synthesis_is_deterministic(tmp_path, make_config):
    cfg = make_config(tmp_path, "synth.num_classes=2", "synth.images_per_class=2", "synth.combinations=1",
                      "synth.test_images_per_class=0", "synth.test_combinations=0")
    synthesize(cfg.synth, tmp_path / "a", show_progress=False)
    synthesize(cfg.synth, tmp_path / "b", show_progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_the_importer_keeps_each_classes_identifiers(tiny_aihub):
    from pillsnap.data.aihub import import_aihub

    info = import_aihub(tiny_aihub, show_progress=False).info
    first = info["K-000001"]  # synthetic class 0: 7 divides its index, so it has two EDI codes
    assert first["edi_codes"] == ["640000001", "A05000001"] and first["item_seq"] == "200000001"
    assert first["drug_name"].startswith("합성약") and first["company"] and first["shape"] and first["colours"]
    assert set(first["imprint"]) == {"front", "back"}
    assert info["K-007920"]["edi_codes"] == ["640007920"]  # class 1: one code
