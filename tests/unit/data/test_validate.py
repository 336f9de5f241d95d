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
