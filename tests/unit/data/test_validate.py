"""Every validation finding, made from a real bad file in a temp copy of the tiny synthetic set."""
import json
from dataclasses import replace

import pytest

from pillsnap.config import ValidationConfig
from pillsnap.data.validate import DataValidationError, raise_if_fatal, validate_manifest, write_report

LENIENT = ValidationConfig(workers=1, max_corrupt_fraction=1, max_missing_fraction=1, max_bbox_error_fraction=1,
                           max_duplicate_fraction=1)


def _kinds(report, image_id):
    return {f.kind for f in report.findings if f.image_id == image_id}


def test_each_bad_input_is_reported(broken):
    m, issues, bad = broken
    report = validate_manifest(m, LENIENT, issues)
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
    report = validate_manifest(m, LENIENT, issues)
    q = set(report.quarantine)
    assert {bad["truncated"], bad["empty"], bad["text"], bad["bbox"], bad["dup_val"]} <= q
    assert bad["dup_train"] not in q
    assert set(m.loc[m.k_code == bad["val_only"], "image_id"]) <= q
    good = m[~m.image_id.isin(q)]
    assert len(good) > len(m) // 2


def test_fatal_thresholds_name_the_worst_offenders(broken, tmp_path):
    m, issues, bad = broken
    strict = replace(LENIENT, max_corrupt_fraction=0.01)
    report = validate_manifest(m, strict, issues)
    with pytest.raises(DataValidationError, match="unreadable or wrong-size images") as e:
        raise_if_fatal(report)
    assert bad["truncated"] in str(e.value) or bad["empty"] in str(e.value)
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["finding_counts"]["unreadable_image"] == 3
    assert "FAIL" in paths["summary"].read_text()
    assert set(json.loads(paths["quarantine"].read_text())) == set(report.quarantine)


def test_clean_data_passes(tiny_manifest):
    report = validate_manifest(tiny_manifest, ValidationConfig(workers=1))
    assert report.fatal == [] and report.findings == [] and report.quarantine == []
    assert report.counts["images"] == len(tiny_manifest) and report.counts["classes"] == 6


def test_classes_lost_to_the_quarantine_or_to_import_issues_are_counted_and_named(tiny_manifest):
    """Issue 28 point 8: full_dataset_processing compared against the manifest less the quarantine, so a class whose
    few photos were all quarantined vanished from both sides; classes whose label files all failed to import
    vanished silently too. They are counted before the quarantine, each with why."""
    from pillsnap.data.aihub import ImportIssue
    from pillsnap.data.validate import issue_k_code, release_classes

    singles = tiny_manifest[tiny_manifest.kind == "single"]
    victim = sorted(singles.k_code.unique())[0]
    quarantine = list(singles[singles.k_code == victim].image_id)
    issues = [ImportIssue("malformed_json", "/d/train/labels/single/TL_1_single/K-777777_json/K-777777_0.json"),
              ImportIssue("malformed_json", "/d/train/labels/single/TL_1_single/K-777777_json/K-777777_1.json"),
              ImportIssue("missing_image", f"/d/train/labels/single/TL_1_single/{victim}_json/x.json")]
    found = release_classes(tiny_manifest, quarantine, issues)
    train_photos = int(((singles.k_code == victim) & (singles.split == "train")).sum())
    assert found["lost"] == {victim: f"all {train_photos} training photos quarantined (validation findings)",
                             "K-777777": "no photo imported (2 malformed_json)"}
    assert found["classes"] == singles.k_code.nunique() + 1 and victim not in found["usable_classes"]
    assert release_classes(tiny_manifest, [], [])["lost"] == {}
    assert issue_k_code("/d/train/labels/combination/TL_1_combo/K-000250-000573_json/K-000573/s.json") == "K-000573"
    assert issue_k_code("/d/somewhere/else.json") is None
