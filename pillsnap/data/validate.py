"""Data validation: a report of everything wrong with a manifest, the quarantine list loaders skip, and
fatal thresholds that stop a run with the worst offenders named.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pillsnap.config import ValidationConfig
from pillsnap.data.aihub import ImportIssue
from pillsnap.data.manifest import image_k_codes
from pillsnap.data.shards import Check, ShardSettings, inspect_photo, manifest_photos

log = logging.getLogger(__name__)
WORST_SHOWN = 5


class DataValidationError(RuntimeError):
    pass


@dataclass
class Finding:
    kind: str  # unreadable_image | size_mismatch | bbox_outside | missing_image | missing_json | malformed_json | …
    image_id: str
    path: str
    detail: str = ""


@dataclass
class ValidationReport:
    counts: Dict[str, int]
    per_class: Dict[str, Dict[str, int]]  # K-code -> {"train": n, "val": n}
    imbalance_ratio: Optional[float]
    val_only_classes: List[str]
    small_classes: List[str]
    duplicates_across_splits: List[Tuple[str, str]]
    findings: List[Finding] = field(default_factory=list)
    quarantine: List[str] = field(default_factory=list)
    fatal: List[str] = field(default_factory=list)

    def finding_counts(self) -> Dict[str, int]:
        return dict(Counter(f.kind for f in self.findings))

    def to_dict(self) -> Dict:
        out = asdict(self)
        out["finding_counts"] = self.finding_counts()
        return out

    def summary(self) -> str:
        c = self.counts
        lines = [
            "# Data validation report", "",
            f"- images: {c['images']} ({c['single']} single, {c['combination']} combination); "
            f"train {c['train']}, val {c['val']}",
            f"- classes: {c['classes']}; imbalance ratio (max/min train images per class): "
            f"{self.imbalance_ratio if self.imbalance_ratio is not None else 'n/a'}",
            f"- val-only classes: {len(self.val_only_classes)} {self.val_only_classes[:WORST_SHOWN]}",
            f"- classes with too few images: {len(self.small_classes)} {self.small_classes[:WORST_SHOWN]}",
            f"- duplicate images across splits: {len(self.duplicates_across_splits)}",
            f"- quarantined (skipped by loaders): {len(self.quarantine)}",
        ]
        for kind, n in sorted(self.finding_counts().items()):
            examples = [f.path for f in self.findings if f.kind == kind][:WORST_SHOWN]
            lines.append(f"- {kind}: {n}, e.g. {examples}")
        lines.append(f"- verdict: {'FAIL: ' + '; '.join(self.fatal) if self.fatal else 'PASS'}")
        return "\n".join(lines) + "\n"


def _check_images(df: pd.DataFrame, cfg: ValidationConfig) -> List[Check]:
    """In this process, one photo after another; data preparation runs the same inspection in shards."""
    settings = ShardSettings(cfg.check_images, cfg.hash_duplicates, None, 0, 0.0, False)
    return [inspect_photo(photo, settings)[0] for photo in manifest_photos(df, include_crops=False)]


def _bbox_findings(df: pd.DataFrame) -> List[Finding]:
    out = []
    for image_id, path, boxes, w, h in zip(df["image_id"], df["image_path"], df["boxes"], df["width"], df["height"]):
        for box in json.loads(boxes or "[]"):
            x, y, bw, bh = box["bbox"]
            if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w or y + bh > h:
                out.append(Finding("bbox_outside", image_id, path,
                                   f"{box['k_code']} bbox {box['bbox']} outside {w}x{h}"))
    return out


def _per_class(df: pd.DataFrame) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for codes, split in zip(image_k_codes(df), df["split"]):
        for k in set(codes):
            counts.setdefault(k, {"train": 0, "val": 0})
            counts[k][split] = counts[k].get(split, 0) + 1
    return dict(sorted(counts.items()))


def validate_manifest(df: pd.DataFrame, cfg: ValidationConfig, import_issues: Sequence[ImportIssue] = (),
                      checks: Optional[Sequence[Check]] = None) -> ValidationReport:
    """`checks`: each photo's (error, sha1) in manifest order, as the data-preparation shards found them;
    without them the photos are inspected here."""
    findings = [Finding(i.kind, Path(i.path).stem, i.path, i.detail) for i in import_issues]
    hashes: Dict[str, str] = {}
    if cfg.check_images or cfg.hash_duplicates:
        if checks is None:
            checks = _check_images(df, cfg)
        if len(checks) != len(df):
            raise ValueError(f"{len(checks)} photo checks for a manifest of {len(df)} photos")
        for (err, digest), image_id, path in zip(checks, df["image_id"], df["image_path"]):
            if err and cfg.check_images:
                kind = "size_mismatch" if err.startswith("size_mismatch") else "unreadable_image"
                findings.append(Finding(kind, image_id, path, err))
            if digest:
                hashes[image_id] = digest
    findings += _bbox_findings(df)
    per_class = _per_class(df)
    train_counts = [c["train"] for c in per_class.values() if c["train"] > 0]
    val_only = sorted(k for k, c in per_class.items() if c["train"] == 0 and c["val"] > 0)
    small = sorted(k for k, c in per_class.items() if 0 < c["train"] + c["val"] < cfg.min_images_per_class)
    duplicates = _duplicates_across_splits(df, hashes)
    quarantine = _quarantine(df, findings, val_only, duplicates)
    counts = {"images": len(df), "single": int((df["kind"] == "single").sum()),
              "combination": int((df["kind"] == "combination").sum()),
              "train": int((df["split"] == "train").sum()), "val": int((df["split"] == "val").sum()),
              "classes": len(per_class)}
    report = ValidationReport(counts, per_class,
                              round(max(train_counts) / min(train_counts), 3) if train_counts else None,
                              val_only, small, duplicates, findings, quarantine)
    report.fatal = _fatal_reasons(report, cfg)
    return report


def _duplicates_across_splits(df: pd.DataFrame, hashes: Dict[str, str]) -> List[Tuple[str, str]]:
    first_by_hash: Dict[str, Tuple[str, str]] = {}
    pairs = []
    for image_id, split in zip(df["image_id"], df["split"]):
        digest = hashes.get(image_id)
        if digest is None:
            continue
        if digest in first_by_hash and first_by_hash[digest][1] != split:
            pairs.append((first_by_hash[digest][0], image_id))
        first_by_hash.setdefault(digest, (image_id, split))
    return pairs


def _quarantine(df: pd.DataFrame, findings: List[Finding], val_only: List[str],
                duplicates: List[Tuple[str, str]]) -> List[str]:
    ids = {f.image_id for f in findings if f.kind in {"unreadable_image", "size_mismatch", "bbox_outside"}}
    val_only_set = set(val_only)
    ids |= {i for i, codes in zip(df["image_id"], image_k_codes(df)) if val_only_set.intersection(codes)}
    split_of = dict(zip(df["image_id"], df["split"]))
    ids |= {b if split_of.get(b) == "val" else a for a, b in duplicates}  # keep the train copy
    return sorted(ids)


def _fatal_reasons(report: ValidationReport, cfg: ValidationConfig) -> List[str]:
    n = max(1, report.counts["images"])
    kinds = report.finding_counts()
    checks = [
        ("unreadable or wrong-size images", kinds.get("unreadable_image", 0) + kinds.get("size_mismatch", 0),
         cfg.max_corrupt_fraction, ("unreadable_image", "size_mismatch")),
        ("missing images or labels", kinds.get("missing_image", 0) + kinds.get("missing_json", 0)
         + kinds.get("malformed_json", 0), cfg.max_missing_fraction, ("missing_image", "missing_json", "malformed_json")),
        ("bboxes outside the image", kinds.get("bbox_outside", 0), cfg.max_bbox_error_fraction, ("bbox_outside",)),
    ]
    fatal = []
    for label, count, limit, kind_set in checks:
        if count / n > limit:
            worst = [f"{f.path} ({f.detail})" for f in report.findings if f.kind in kind_set][:WORST_SHOWN]
            fatal.append(f"{label}: {count}/{n} = {count / n:.2%} > {limit:.2%}; worst: {worst}")
    dup = len(report.duplicates_across_splits)
    if dup / n > cfg.max_duplicate_fraction:
        fatal.append(f"duplicates across splits: {dup}/{n} > {cfg.max_duplicate_fraction:.2%}; "
                     f"worst: {report.duplicates_across_splits[:WORST_SHOWN]}")
    if cfg.fail_on_val_only_classes and report.val_only_classes:
        fatal.append(f"val-only classes: {report.val_only_classes[:WORST_SHOWN]}")
    return fatal


def write_report(report: ValidationReport, out_dir: Path) -> Dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "validation_report.json", "summary": out_dir / "validation_report.md",
             "quarantine": out_dir / "quarantine.json"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    paths["summary"].write_text(report.summary())
    paths["quarantine"].write_text(json.dumps(report.quarantine))
    return paths


def raise_if_fatal(report: ValidationReport) -> None:
    if report.fatal:
        raise DataValidationError("data validation failed:\n  - " + "\n  - ".join(report.fatal))


def load_quarantine(path: Path) -> List[str]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else []


def write_photo_hashes(checks: Sequence[Check], path: Path) -> Path:
    """The sorted sha1 digests of the photos whose bytes were read (20 bytes each: ~50 MB for the release)."""
    digests = sorted({bytes.fromhex(digest) for _, digest in checks if digest})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 20))
    return path


def read_photo_hashes(path: Path) -> set:
    return {row.tobytes() for row in np.load(path)}


_ISSUE_FOLDER = re.compile(r"^(K-\d{6})(_json)?$")


def issue_k_code(path: str) -> Optional[str]:
    """The K-code an AIHub file belongs to, from its folder (labels: K-000001_json/ for a single photo, the pill's
    K-000573/ inside a combination's folder; images: K-000001/), or None."""
    match = _ISSUE_FOLDER.match(Path(path).parent.name)
    return match.group(1) if match else None


def release_classes(manifest: pd.DataFrame, quarantine: Sequence[str],
                    import_issues: Sequence[ImportIssue] = ()) -> Dict[str, Any]:
    """Every class the release shows single photos of (counted BEFORE the quarantine, and from the label files that
    failed to import), the classes left with a usable training photo, and each class that has none, with why.
    Counting after the quarantine would let a class whose photos are all broken vanish from both sides."""
    singles = manifest[manifest["kind"] == "single"]
    train = singles[singles["split"] == "train"]
    usable = train[~train["image_id"].isin(set(quarantine))]
    per_class, shown = train["k_code"].value_counts(), set(singles["k_code"])
    lost = {k: (f"all {per_class[k]} training photos quarantined (validation findings)" if k in per_class.index
                else "only validation photos, no training photo")
            for k in sorted(shown - set(usable["k_code"]))}
    failed: Dict[str, Counter] = {}
    for issue in import_issues:
        k_code = issue_k_code(issue.path)
        if k_code is not None and k_code not in shown:
            failed.setdefault(k_code, Counter())[issue.kind] += 1
    for k_code, kinds in failed.items():
        lost[k_code] = "no photo imported (" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")"
    return {"classes": len(shown | set(lost)), "usable_classes": sorted(set(usable["k_code"])),
            "usable_photos": int(len(usable)), "lost": dict(sorted(lost.items()))}
