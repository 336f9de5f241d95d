"""Import the AIHub layout (real or synthetic) into a manifest.

Label files are parsed one at a time and only the needed fields kept, so 2.6M files never sit in memory as
text. A combination image has one JSON per pill (in a sub-folder named after that pill's K-code): they are
merged by file stem, each box keeping its own K-code.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pandas as pd

from pillsnap.data.manifest import from_rows
from pillsnap.progress import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_COMBO_STEM = re.compile(r"^K-\d{6}(-\d{6})+_")


@dataclass
class ImportIssue:
    kind: str  # missing_image | missing_json | malformed_json | kcode_mismatch | duplicate_file_name
    path: str
    detail: str = ""


@dataclass
class ImportResult:
    manifest: pd.DataFrame
    issues: List[ImportIssue] = field(default_factory=list)
    info: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # K-code -> class_info of its labels

    def issues_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(i) for i in self.issues], columns=["kind", "path", "detail"])


def _walk(root: Path, suffixes: set) -> Iterator[Path]:
    for dirpath, _, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower() in suffixes:
                yield Path(dirpath) / name


def _index_images(images_root: Path, issues: List[ImportIssue]) -> Dict[str, Path]:
    index: Dict[str, Path] = {}
    for path in _walk(images_root, IMAGE_SUFFIXES):
        if path.stem in index:
            issues.append(ImportIssue("duplicate_file_name", str(path), f"same stem as {index[path.stem]}"))
            continue
        index[path.stem] = path
    return index


def _parse_label(path: Path) -> Tuple[Dict, List[float]]:
    """The image record and the first bbox of one label file; raises ValueError with a reason."""
    try:
        data = json.loads(path.read_bytes())
        image = data["images"][0]
        annotations = data.get("annotations") or []
        bbox = [float(v) for v in annotations[0]["bbox"]] if annotations else []
        k_code = image["dl_mapping_code"]
        int(image["width"]), int(image["height"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if bbox and len(bbox) != 4:
        raise ValueError(f"bbox has {len(bbox)} values, expected 4")
    if not re.fullmatch(r"K-\d{6}", str(k_code)):
        raise ValueError(f"dl_mapping_code {k_code!r} is not a K-code")
    return image, bbox


@dataclass
class LabelPart:
    """What a run of label files says, by image stem (a combination's labels may fall in two parts: merged later)."""
    records: Dict[str, Dict] = field(default_factory=dict)
    issues: List[ImportIssue] = field(default_factory=list)
    info: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def split_folders(split_root: Path) -> Tuple[Path, Path]:
    split_root = Path(split_root)
    images_root, labels_root = split_root / "images", split_root / "labels"
    for needed in (images_root, labels_root):
        if not needed.is_dir():
            raise FileNotFoundError(f"AIHub layout expected {needed} (see reference/dataset-format.md)")
    return images_root, labels_root


def label_files(split_root: Path) -> List[str]:
    """Every label file of a split, in the order they are merged."""
    return sorted(str(p) for p in _walk(split_folders(split_root)[1], {".json"}))


def parse_labels(paths: Sequence[str], bar=None) -> LabelPart:
    """Parse label files one at a time, keeping only the fields the manifest needs."""
    part = LabelPart()
    for name in paths:
        path = Path(name)
        if bar is not None:
            bar.update()
        try:
            image, bbox = _parse_label(path)
        except ValueError as e:
            part.issues.append(ImportIssue("malformed_json", str(path), str(e)))
            continue
        except Exception as e:  # not the file's content (memory, the file system): stop, naming the file
            raise RuntimeError(f"{path}: {type(e).__name__}: {e}") from e
        _add_label(part.records, part.info, part.issues, path, image, bbox)
    return part


def assemble_split(split_root: Path, split: str, parts: Sequence[LabelPart]) -> ImportResult:
    """The manifest of a split from its label parts (in label-file order) and its image files."""
    images_root, _ = split_folders(split_root)
    issues: List[ImportIssue] = []
    image_index = _index_images(images_root, issues)
    records: Dict[str, Dict] = {}
    info: Dict[str, Dict[str, Any]] = {}
    for part in parts:
        issues += part.issues
        for k_code, about in part.info.items():
            info.setdefault(k_code, about)
        for stem, rec in part.records.items():
            if stem in records:
                records[stem]["boxes"] += rec["boxes"]
            else:
                records[stem] = {**rec, "boxes": list(rec["boxes"])}
    rows = []
    for stem, rec in records.items():
        img = image_index.get(stem)
        if img is None:
            issues.append(ImportIssue("missing_image", rec["label"], f"no image file named {stem}.*"))
            continue
        rows.append({"image_id": stem, "image_path": str(img.resolve()), "split": split, "kind": rec["kind"],
                     "k_code": rec["k_code"], "boxes": json.dumps(rec["boxes"]), "width": rec["width"],
                     "height": rec["height"]})
    for stem in sorted(set(image_index) - set(records)):
        issues.append(ImportIssue("missing_json", str(image_index[stem]), "image has no label file"))
    log.info("imported %d images from %s (%d issues)", len(rows), split_root, len(issues))
    return ImportResult(from_rows(rows), issues, info)


def import_aihub_split(split_root: Path, split: str = "", show_progress: bool = True) -> ImportResult:
    """Import one AIHub split folder (holding images/ and labels/) in this process. `split` is written to every
    row ("" lets `assign_splits` decide later). Data preparation parses the label files in shards instead."""
    paths = label_files(split_root)
    with progress(total=len(paths), desc=f"import {Path(split_root).name}", unit="json",
                  enabled=show_progress) as bar:
        part = parse_labels(paths, bar)
    return assemble_split(split_root, split, [part])


def class_info(image: Dict) -> Dict[str, Any]:
    """What an AIHub label says about its drug, as the API returns it (EDI codes split, empty fields dropped)."""
    text = lambda key: str(image.get(key) or "").strip()  # noqa: E731
    info = {"drug_name": text("dl_name"), "drug_name_en": text("dl_name_en"),
            "edi_codes": [c.strip() for c in text("di_edi_code").split(",") if c.strip()],
            "item_seq": text("item_seq"), "company": text("dl_company"), "shape": text("drug_shape"),
            "colours": [c for c in (text("color_class1"), text("color_class2")) if c],
            "imprint": {"front": text("print_front"), "back": text("print_back")}}
    return info


def _add_label(records: Dict[str, Dict], info: Dict[str, Dict[str, Any]], issues: List[ImportIssue], path: Path,
               image: Dict, bbox: List[float]) -> None:
    stem = path.stem
    k_code = image["dl_mapping_code"]
    if k_code not in info:
        info[k_code] = class_info(image)
    combination = bool(_COMBO_STEM.match(stem))
    if not combination and not stem.startswith(k_code + "_"):
        issues.append(ImportIssue("kcode_mismatch", str(path), f"dl_mapping_code {k_code} vs file {stem}"))
    rec = records.setdefault(stem, {"kind": "combination" if combination else "single",
                                    "k_code": "" if combination else k_code, "boxes": [],
                                    "width": int(image["width"]), "height": int(image["height"]),
                                    "label": str(path)})
    if bbox:
        rec["boxes"].append({"k_code": k_code, "bbox": bbox})


def training_split(data_root: Path) -> Path:
    """The AIHub *Training* split. `val/` is the sealed test set, imported by the final test alone."""
    return Path(data_root) / "train"


def import_aihub(data_root: Path, show_progress: bool = True) -> ImportResult:
    return import_aihub_split(training_split(data_root), "", show_progress)


def import_aihub_test(data_root: Path, show_progress: bool = True) -> ImportResult:
    return import_aihub_split(Path(data_root) / "val", "test", show_progress)
