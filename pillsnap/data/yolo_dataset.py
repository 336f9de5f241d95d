"""YOLO-format detection data from a stage subset: ONE class "pill", written once per content hash and reused.

<exp_dir>/data/stage_<n>/yolo/
  images/{train,val}/<image_id><ext>   hard links to the source images (symlink, then copy, as fallbacks)
  labels/{train,val}/<image_id>.txt    one "0 cx cy w h" line per pill, normalised to the image size
  train.txt, val.txt                   absolute image paths, one a line
  data.yaml                            path / train / val / nc / names, for ultralytics
  build.json                           the marker: content hash and counts, written last

The folder is built next to the final one and swapped in, so a crash never leaves a half-built dataset that
looks complete. The hash covers the selected rows (paths, kinds and boxes) and the format.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
import yaml

from pillsnap.core import layout
from pillsnap.data.manifest import manifest_hash
from pillsnap.lock import wait_for_lock

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MARKER = "build.json"
SPLITS = ("train", "val")


@dataclass
class YoloDataset:
    root: str
    data_yaml: str
    train_list: str
    val_list: str
    content_hash: str
    images: Dict[str, int]  # split -> images written
    boxes: Dict[str, int]  # split -> boxes written
    skipped_boxes: int  # degenerate boxes (zero area after clipping to the image)
    skipped_images: int  # images left without any usable box
    link_mode: str  # hardlink | symlink | copy
    include_single_images: bool
    composition: Dict[str, Dict[str, int]] = field(default_factory=dict)  # split -> kind -> photos
    cap: Optional[int] = None  # data.stages.N.detector_images
    rebuilt: bool = False

    def ultralytics_data(self) -> Dict:
        """The dict ultralytics' trainers and datasets expect (what its dataset check would return, offline)."""
        return {"path": self.root, "train": self.train_list, "val": self.val_list, "nc": 1, "names": {0: "pill"},
                "channels": 3, "yaml_file": self.data_yaml}


def yolo_dir(exp_dir: Path, stage: int) -> Path:
    return layout.stage_data_dir(exp_dir, stage) / "yolo"


def detection_rows(subset: pd.DataFrame, include_single_images: bool = True, cap: Optional[int] = None,
                   val_fraction: float = 0.15) -> pd.DataFrame:
    """The detector's photos: combination photos first, then (when asked) single photos, each with a box.

    `cap` limits the training photos (validation keeps the same share: cap x val_fraction / (1 - val_fraction));
    within a kind the order is a fixed hash of the photo id, so a cap takes the same photos every time.
    """
    kinds = ["combination", "single"] if include_single_images else ["combination"]
    rows = subset[subset["kind"].isin(kinds) & subset["split"].isin(SPLITS)]
    rows = rows[rows["boxes"].fillna("").str.len() > 2]  # "[]" has no box
    rank = pd.util.hash_pandas_object(rows["image_id"], index=False).to_numpy()
    rows = rows.assign(_kind=(rows["kind"] == "single").to_numpy(), _rank=rank).sort_values(["_kind", "_rank"])
    if cap is not None:
        limits = {"train": cap, "val": math.ceil(cap * val_fraction / (1 - val_fraction))}
        rows = pd.concat([part.head(limits[split]) for split, part in rows.groupby("split")])
    return rows.drop(columns=["_kind", "_rank"]).sort_values("image_id")


def content_hash(rows: pd.DataFrame) -> str:
    return f"v{FORMAT_VERSION}-{manifest_hash(rows)}"


def label_lines(boxes: List[Dict], width: int, height: int) -> Tuple[List[str], int]:
    """YOLO lines for pixel [x, y, w, h] boxes, clipped to the image; returns (lines, degenerate boxes skipped)."""
    lines, skipped = [], 0
    for box in boxes:
        x, y, w, h = (float(v) for v in box["bbox"])
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x2 <= x1 or y2 <= y1:
            skipped += 1
            continue
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        lines.append(f"0 {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")
    return lines, skipped


def build_yolo_dataset(subset: pd.DataFrame, exp_dir: Path, stage: int, include_single_images: bool = True,
                       cap: Optional[int] = None, val_fraction: float = 0.15) -> YoloDataset:
    """Write (or reuse) the YOLO dataset of one stage subset (see detection_rows for what it holds)."""
    rows = detection_rows(subset, include_single_images, cap, val_fraction)
    return _build(rows, exp_dir, stage, include_single_images, cap)


def _build(rows: pd.DataFrame, exp_dir: Path, stage: int, include_single_images: bool,
           cap: Optional[int]) -> YoloDataset:
    for split in SPLITS:
        if not (rows["split"] == split).any():
            raise ValueError(f"stage {stage}: no {split} photo with a box for the detector (combination photos, "
                             f"and single photos with detection.include_single_images={include_single_images}); "
                             "a photo's box comes from its label (AIHub JSON bbox, or the CSV's bbox column)")
    key, final = content_hash(rows), yolo_dir(exp_dir, stage)
    # Builders take turns (the ranks of one training each ask for the dataset): the second finds the first's
    # build and reuses it, instead of swapping its own in while the first reads train.txt.
    with wait_for_lock(final.with_name(f".{final.name}.lock")):
        return _build_locked(rows, final, key, include_single_images, cap)


def _build_locked(rows: pd.DataFrame, final: Path, key: str, include_single_images: bool,
                  cap: Optional[int]) -> YoloDataset:
    existing = read_marker(final)
    if existing is not None and existing.content_hash == key:
        log.info("detector data: reusing %s (hash %s)", final, key)
        return existing
    if existing is not None:
        log.info("detector data: %s was built for %s, rebuilding for %s", final, existing.content_hash, key)
    building = final.with_name(f"{final.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    result = _write(rows, building, final, key, include_single_images, cap)
    _swap_in(building, final)
    return result


def stage_detector_dataset(cfg, subset: pd.DataFrame, stage: int) -> Tuple[YoloDataset, pd.DataFrame]:
    """The stage's YOLO dataset as the config asks (singles included, the stage's detector_images cap) and the
    validation rows it holds."""
    include, cap = cfg.detection.include_single_images, cfg.stage(stage).detector_images
    rows = detection_rows(subset, include, cap, cfg.data.val_fraction)
    return _build(rows, cfg.exp_dir, stage, include, cap), rows[rows["split"] == "val"]


def detector_facts(data: YoloDataset) -> Dict:
    """What the detector trained and was validated on, for its result and the stage report."""
    return {"yolo_dataset": data.root, "data_yaml": data.data_yaml, "images": data.images, "boxes": data.boxes,
            "composition": data.composition, "cap": data.cap, "include_single_images": data.include_single_images}


def read_marker(root: Path) -> YoloDataset | None:
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    try:
        return YoloDataset(**{**json.loads(marker.read_text()), "rebuilt": False})
    except (ValueError, TypeError) as e:  # an old or damaged marker means "build again", not "crash"
        log.warning("detector data: unreadable marker %s (%s); rebuilding", marker, e)
        return None


def _write(rows: pd.DataFrame, building: Path, final: Path, key: str, include_single: bool,
           cap: Optional[int]) -> YoloDataset:
    images, boxes = {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}
    composition = {s: {"combination": 0, "single": 0} for s in SPLITS}
    skipped_boxes = skipped_images = 0
    lists: Dict[str, List[str]] = {s: [] for s in SPLITS}
    modes = set()
    for image_id, path, split, raw, width, height, kind in zip(rows["image_id"], rows["image_path"], rows["split"],
                                                              rows["boxes"], rows["width"], rows["height"],
                                                              rows["kind"]):
        lines, skipped = label_lines(json.loads(raw), int(width), int(height))
        skipped_boxes += skipped
        if not lines:
            skipped_images += 1
            continue
        name = f"{image_id}{Path(path).suffix.lower()}"
        modes.add(_link(Path(path), building / "images" / split / name))
        label = building / "labels" / split / f"{image_id}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("\n".join(lines) + "\n")
        lists[split].append(str(final / "images" / split / name))  # the path it will have once swapped in
        images[split] += 1
        boxes[split] += len(lines)
        composition[split][kind] += 1
    for split in SPLITS:
        (building / f"{split}.txt").write_text("\n".join(lists[split]) + "\n")
    data = {"path": str(final), "train": "train.txt", "val": "val.txt", "nc": 1, "names": {0: "pill"}}
    (building / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    link_mode = "copy" if "copy" in modes else "symlink" if "symlink" in modes else "hardlink"
    result = YoloDataset(str(final), str(final / "data.yaml"), str(final / "train.txt"), str(final / "val.txt"),
                         key, images, boxes, skipped_boxes, skipped_images, link_mode, include_single, composition,
                         cap, rebuilt=True)
    marker = asdict(result)
    marker.pop("rebuilt")
    (building / MARKER).write_text(json.dumps(marker, indent=1))
    log.info("detector data: train %d photos (%d combination + %d single), val %d (%d + %d); %d / %d boxes (%s, "
             "cap %s) -> %s", images["train"], composition["train"]["combination"], composition["train"]["single"],
             images["val"], composition["val"]["combination"], composition["val"]["single"], boxes["train"],
             boxes["val"], link_mode, cap, final)
    if skipped_boxes or skipped_images:
        log.warning("detector data: skipped %d degenerate boxes and %d images left without a box",
                    skipped_boxes, skipped_images)
    return result


def _link(source: Path, target: Path) -> str:
    """Hard link (survives moves of the source), else symlink (other file system), else copy."""
    if not source.is_file():
        raise FileNotFoundError(f"detector data: image {source} listed in the stage subset does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        pass
    try:
        target.symlink_to(source.resolve())
        return "symlink"
    except OSError:
        shutil.copy2(source, target)
        return "copy"


def _swap_in(building: Path, final: Path) -> None:
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if final.exists():
        final.replace(old)
    building.replace(final)
    shutil.rmtree(old, ignore_errors=True)
