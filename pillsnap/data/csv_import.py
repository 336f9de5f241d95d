"""Import a plain manifest CSV: image_path, k_code, optional bbox (x,y,w,h or columns x,y,w,h), optional split.

Several rows with the same image_path make one combination image, each row one pill with its own K-code.
Rows with split=test are the sealed test set: skipped unless `include_test` (the final test alone asks).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import pandas as pd
from PIL import Image

from pillsnap.data.aihub import ImportIssue, ImportResult
from pillsnap.data.manifest import from_rows
from pillsnap.progress import progress

REQUIRED = ("image_path", "k_code")
SPLITS = {"", "train", "val", "test"}


class CsvManifestError(ValueError):
    pass


def _bbox(row: pd.Series, csv_path: Path, line: int) -> List[float]:
    if "bbox" in row and str(row["bbox"]).strip():
        parts = re.split(r"[,\s;]+", str(row["bbox"]).strip(" []"))
    elif all(c in row for c in "xywh") and str(row["x"]).strip():
        parts = [row[c] for c in "xywh"]
    else:
        return []
    try:
        box = [float(p) for p in parts]
    except ValueError:
        raise CsvManifestError(f"{csv_path}:{line}: bbox {parts} is not 4 numbers") from None
    if len(box) != 4:
        raise CsvManifestError(f"{csv_path}:{line}: bbox has {len(box)} values, expected 4 (x,y,w,h)")
    return box


def import_csv(csv_path: Path, include_test: bool = False, show_progress: bool = True) -> ImportResult:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CsvManifestError(f"manifest CSV not found: {csv_path}")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in REQUIRED if c not in table.columns]
    if missing:
        raise CsvManifestError(f"{csv_path}: missing column(s) {missing}; have {list(table.columns)}")
    if "split" not in table.columns:
        table["split"] = ""
    bad = sorted(set(table["split"]) - SPLITS)
    if bad:
        raise CsvManifestError(f"{csv_path}: column split has value(s) {bad}; allowed: train, val, test or empty")
    if not include_test:
        table = table[table["split"] != "test"]
    issues: List[ImportIssue] = []
    images: Dict[str, Dict] = {}
    for line, row in zip(table.index + 2, (r for _, r in table.iterrows())):
        rec = images.setdefault(row["image_path"], {"split": row["split"], "pills": []})
        rec["pills"].append({"k_code": row["k_code"].strip(), "bbox": _bbox(row, csv_path, line)})
    rows = []
    with progress(total=len(images), desc="import csv", unit="img", enabled=show_progress) as bar:
        for raw_path, rec in images.items():
            bar.update()
            path = Path(raw_path) if Path(raw_path).is_absolute() else (csv_path.parent / raw_path)
            try:
                with Image.open(path) as im:  # reads the header only
                    width, height = im.size
            except (OSError, ValueError) as e:
                issues.append(ImportIssue("missing_image", str(path), f"{type(e).__name__}: {e}"))
                continue
            pills = rec["pills"]
            single = len(pills) == 1
            rows.append({"image_id": path.stem, "image_path": str(path.resolve()), "split": rec["split"],
                         "kind": "single" if single else "combination",
                         "k_code": pills[0]["k_code"] if single else "",
                         "boxes": json.dumps([p for p in pills if p["bbox"]]), "width": width, "height": height})
    return ImportResult(from_rows(rows), issues, {})
