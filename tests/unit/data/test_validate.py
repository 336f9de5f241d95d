"""Every validation finding, made from a real bad file in a temp copy of the tiny synthetic set."""
import json
import shutil
from dataclasses import replace

import pytest

from pillsnap.config import ValidationConfig
from pillsnap.data.aihub import import_aihub
from pillsnap.data.manifest import assign_splits
from pillsnap.data.validate import DataValidationError, raise_if_fatal, validate_manifest, write_report

LENIENT = ValidationConfig(workers=1, max_corrupt_fraction=1, max_missing_fraction=1, max_bbox_error_fraction=1,
                           max_duplicate_fraction=1)


@pytest.fixture(scope="module")
def broken(tiny_aihub, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken") / "aihub"
    shutil.copytree(tiny_aihub / "train", root / "train")
    singles = sorted((root / "train/images/single").rglob("*.png"))
    labels = {p.stem: p for p in (root / "train/labels/single").rglob("*.json")}
    bad = {}
    data = singles[0].read_bytes()
    singles[0].write_bytes(data[: len(data) // 2]); bad["truncated"] = singles[0].stem
    singles[1].write_bytes(b""); bad["empty"] = singles[1].stem
    singles[2].write_text("this is not a png"); bad["text"] = singles[2].stem
    labels[singles[3].stem].write_text('{"images": [{"file_name": '); bad["malformed"] = singles[3].stem
    singles[4].unlink(); bad["no_image"] = singles[4].stem
    labels[singles[5].stem].unlink(); bad["no_json"] = singles[5].stem
    label = json.loads(labels[singles[6].stem].read_text())
    label["annotations"][0]["bbox"] = [label["images"][0]["width"] - 5, 0, 50, 20]
    labels[singles[6].stem].write_text(json.dumps(label)); bad["bbox"] = singles[6].stem
    result = import_aihub(root, show_progress=False)
    m = assign_splits(result.manifest, 0.2, 0)
    # a class present only in val
    in_combos = {b["k_code"] for boxes in m.loc[m.kind == "combination", "boxes"] for b in json.loads(boxes)}
    val_only = sorted(set(m.loc[m.kind == "single", "k_code"]) - in_combos)[-1]
    m.loc[m.k_code == val_only, "split"] = "val"
    # the same picture in train and in val
    broken_ids = set(bad.values())
    train_img = m[(m.split == "train") & (m.kind == "single") & ~m.image_id.isin(broken_ids)].iloc[0]
    val_row = m[(m.split == "val") & (m.kind == "single") & (m.k_code != val_only) & ~m.image_id.isin(broken_ids)].iloc[0]
    shutil.copyfile(train_img.image_path, val_row.image_path)
    bad.update(val_only=val_only, dup_train=train_img.image_id, dup_val=val_row.image_id)
    return m, result.issues, bad


def _kinds(report, image_id):
    return {f.kind for f in report.findings if f.image_id == image_id}


def test_each_bad_input_is_reported(broken):
    m, issues, bad = broken
    report = validate_manifest(m, LENIENT, issues, show_progress=False)
    assert "unreadable_image" in _kinds(report, bad["truncated"])
    assert "unreadable_image" in _kinds(report, bad["empty"])
    assert "unreadable_image" in _kinds(report, bad["text"])
    assert "malformed_json" in _kinds(report, bad["malformed"])
    assert "missing_image" in _kinds(report, bad["no_image"])
    assert "missing_json" in _kinds(report, bad["no_json"])
    assert "bbox_outside" in _kinds(report, bad["bbox"])
    assert report.val_only_classes == [bad["val_only"]]
    assert (bad["dup_train"], bad["dup_val"]) in report.duplicates_across_splits
    assert "0 bytes" in next(f.detail for f in report.findings if f.image_id == bad["empty"])


def test_quarantine_lists_what_loaders_must_skip(broken):
    m, issues, bad = broken
    report = validate_manifest(m, LENIENT, issues, show_progress=False)
    q = set(report.quarantine)
    assert {bad["truncated"], bad["empty"], bad["text"], bad["bbox"], bad["dup_val"]} <= q
    assert bad["dup_train"] not in q
    assert set(m.loc[m.k_code == bad["val_only"], "image_id"]) <= q
    good = m[~m.image_id.isin(q)]
    assert len(good) > len(m) // 2


def test_fatal_thresholds_name_the_worst_offenders(broken, tmp_path):
    m, issues, bad = broken
    strict = replace(LENIENT, max_corrupt_fraction=0.01)
    report = validate_manifest(m, strict, issues, show_progress=False)
    with pytest.raises(DataValidationError, match="unreadable or wrong-size images") as e:
        raise_if_fatal(report)
    assert bad["truncated"] in str(e.value) or bad["empty"] in str(e.value)
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["finding_counts"]["unreadable_image"] == 3
    assert "FAIL" in paths["summary"].read_text()
    assert set(json.loads(paths["quarantine"].read_text())) == set(report.quarantine)


def test_clean_data_passes(tiny_manifest):
    report = validate_manifest(tiny_manifest, ValidationConfig(workers=1), show_progress=False)
    assert report.fatal == [] and report.findings == [] and report.quarantine == []
    assert report.counts["images"] == len(tiny_manifest) and report.counts["classes"] == 6
