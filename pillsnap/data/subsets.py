"""Stage subsets: nested class sets (the classes of stage n are inside stage n+1) with per-class sampling
of the already-fixed train/val split, deterministic by seed. The test split is never touched here.

Classes and images are ranked once by a seeded hash, and each stage takes a prefix of those rankings, so
growing a stage only adds classes and images: a stage can warm-start from the previous one.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List

import pandas as pd

from pillsnap.config import StageSpec
from pillsnap.data.manifest import image_k_codes, manifest_hash, read_manifest, write_manifest


@dataclass
class SubsetSummary:
    stage: int
    classes_requested: int | None
    classes: int
    images_requested: int | None
    train_single: int
    val_single: int
    train_combination: int
    val_combination: int
    per_class_train_min: int
    per_class_train_max: int
    k_codes: List[str]
    subset_hash: str
    notes: List[str]

    @property
    def n_train(self) -> int:
        return self.train_single + self.train_combination

    @property
    def n_val(self) -> int:
        return self.val_single + self.val_combination


def _rank(keys: Iterable[str], seed: int, salt: str) -> Dict[str, str]:
    return {k: hashlib.sha1(f"{seed}:{salt}:{k}".encode()).hexdigest() for k in keys}


def build_stage_subset(manifest: pd.DataFrame, stage: int, spec: StageSpec, seed: int,
                       quarantine: Iterable[str] = ()) -> tuple[pd.DataFrame, SubsetSummary]:
    if manifest["split"].eq("test").any():
        raise ValueError("stage subsets are built from train/val rows only; the manifest holds test rows")
    df = manifest[~manifest["image_id"].isin(set(quarantine))]
    singles = df[df["kind"] == "single"]
    train_classes = sorted(set(singles.loc[singles["split"] == "train", "k_code"]))
    class_rank = _rank(train_classes, seed, "class")
    ordered = sorted(train_classes, key=class_rank.__getitem__)
    notes = []
    n_classes = len(ordered) if spec.classes is None else min(spec.classes, len(ordered))
    if spec.classes is not None and spec.classes > len(ordered):
        notes.append(f"asked for {spec.classes} classes, only {len(ordered)} have training images")
    chosen = set(ordered[:n_classes])
    picked = _sample_singles(singles[singles["k_code"].isin(chosen)], spec, n_classes, seed, notes)
    combos = df[df["kind"] == "combination"]
    combo_ok = [set(codes) <= chosen and len(codes) > 0 for codes in image_k_codes(combos)]
    subset = pd.concat([picked, combos[combo_ok]]).sort_values(["split", "kind", "image_id"]).reset_index(drop=True)
    per_class = subset[(subset["kind"] == "single") & (subset["split"] == "train")].groupby("k_code").size()
    count = lambda split, kind: int(((subset["split"] == split) & (subset["kind"] == kind)).sum())  # noqa: E731
    summary = SubsetSummary(
        stage=stage, classes_requested=spec.classes, classes=len(chosen), images_requested=spec.images,
        train_single=count("train", "single"), val_single=count("val", "single"),
        train_combination=count("train", "combination"), val_combination=count("val", "combination"),
        per_class_train_min=int(per_class.min()) if len(per_class) else 0,
        per_class_train_max=int(per_class.max()) if len(per_class) else 0,
        k_codes=sorted(chosen), subset_hash=manifest_hash(subset), notes=notes)
    return subset, summary


def _sample_singles(singles: pd.DataFrame, spec: StageSpec, n_classes: int, seed: int,
                    notes: List[str]) -> pd.DataFrame:
    if spec.images is None or n_classes == 0:
        return singles
    per_class = math.ceil(spec.images / n_classes)
    image_rank = _rank(singles["image_id"], seed, "image")
    keep: List[str] = []
    for _, group in singles.groupby("k_code", sort=True):
        total = len(group)
        budget = min(per_class, total)
        for split, part in group.groupby("split"):
            # stratified: each split keeps its share of the class's images
            n = max(1, round(budget * len(part) / total)) if budget else 0
            keep += sorted(part["image_id"], key=image_rank.__getitem__)[:n]
    if len(keep) < spec.images:
        notes.append(f"asked for {spec.images} single images, the chosen classes have {len(keep)}")
    return singles[singles["image_id"].isin(set(keep))]


def stage_dir(exp_dir: Path, stage: int) -> Path:
    return Path(exp_dir) / "data" / f"stage_{stage}"


def write_subset(subset: pd.DataFrame, summary: SubsetSummary, exp_dir: Path) -> Path:
    out = stage_dir(exp_dir, summary.stage)
    write_manifest(subset, out / "subset.csv")
    (out / "subset.json").write_text(json.dumps(asdict(summary), indent=1))
    return out


def read_subset(exp_dir: Path, stage: int) -> tuple[pd.DataFrame, SubsetSummary]:
    out = stage_dir(exp_dir, stage)
    summary = SubsetSummary(**json.loads((out / "subset.json").read_text()))
    return read_manifest(out / "subset.csv"), summary
