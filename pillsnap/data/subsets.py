"""Stage subsets: nested class sets (the classes of stage n are inside stage n+1) with per-class sampling of the
already-fixed train/val split, deterministic by seed. The test split is never touched here.

Classes and photos are ranked once by a seeded hash and each stage takes a prefix of those rankings, so growing
a stage only adds classes and photos: a stage can warm-start from the previous one.

  training photos   `images` single photos of the stage's classes, the same number per class (or all a class has)
  validation        val photos of the same classes, stratified per class: the per-class share that matches the
                    training photos, raised until the set holds at least `min_eval_samples` (the Go/No-Go gate)
                    or the classes' val photos run out (the summary then says so, with numbers)
  combinations      EVERY train / val combination photo, whatever its K-codes: the detector has one class,
                    "pill", and learns from all of them; the classifier's label space is the stage's classes, and
                    a pill outside it is reported as out of scope by the combination evaluation
Vectorised (pandas hashing, one sort): all four stages of the real release (2.47M photos) build in seconds.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np
import pandas as pd

from pillsnap.core import layout
from pillsnap.core.identity import ArtifactChanged
from pillsnap.config import StageSpec
from pillsnap.data.manifest import image_k_codes, manifest_hash, read_manifest, write_manifest


@dataclass
class SubsetSummary:
    stage: int
    classes_requested: Optional[int]
    classes: int
    images_requested: Optional[int]
    train_single: int
    val_single: int
    train_combination: int
    val_combination: int
    per_class_train_min: int
    per_class_train_max: int
    k_codes: List[str]
    subset_hash: str
    notes: List[str]
    min_eval_samples: int = 0
    val_per_class: int = 0  # the per-class validation quota that was applied
    combinations_in_scope: int = 0  # combination photos whose every pill is in the stage's classes
    imbalance_ratio: Optional[float] = None  # most / fewest training photos per class
    detector_images_requested: Optional[int] = None
    classes_available: int = 0  # classes with training photos in the manifest (after quarantine)
    train_available: int = 0  # training photos of the chosen classes, before the per-class quota
    val_hash: str = ""  # the row hash of its validation photos (what an evaluation of this subset must have read)

    @property
    def n_train(self) -> int:
        return self.train_single + self.train_combination

    @property
    def n_val(self) -> int:
        return self.val_single + self.val_combination


def _rank(values: pd.Series, seed: int, salt: str) -> np.ndarray:
    """A seeded pseudo-random order key per value (stable across runs and machines)."""
    key = hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:16]
    return pd.util.hash_pandas_object(values.reset_index(drop=True), index=False, hash_key=key).to_numpy()


def _first_per_class(rows: pd.DataFrame, quota: pd.Series, seed: int) -> pd.DataFrame:
    """The first `quota[k_code]` photos of each class in the seeded photo order."""
    codes, uniques = pd.factorize(rows["k_code"])
    order = np.lexsort((_rank(rows["image_id"], seed, "image"), codes))  # by class, then by rank: integer keys
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    limits = quota.reindex(uniques).fillna(0).to_numpy()[sorted_codes]
    return rows.iloc[order[position < limits]]


def _val_quota(pool: pd.Series, minimum: int, floor: int) -> int:
    """Smallest per-class quota q >= floor with sum(min(q, pool)) >= minimum (or the whole pool)."""
    sizes = np.sort(pool.to_numpy())
    total = lambda q: int(np.minimum(sizes, q).sum())  # noqa: E731
    q = max(floor, 0)
    if total(q) >= minimum or not len(sizes):
        return q
    low, high = q, int(sizes[-1])
    while low < high:  # total() grows with q: bisect for the smallest q that reaches the minimum
        mid = (low + high) // 2
        low, high = (mid + 1, high) if total(mid) < minimum else (low, mid)
    return low


def build_stage_subset(manifest: pd.DataFrame, stage: int, spec: StageSpec, seed: int,
                       quarantine: Iterable[str] = (), val_fraction: float = 0.15) -> tuple[pd.DataFrame, SubsetSummary]:
    if manifest["split"].eq("test").any():
        raise ValueError("stage subsets are built from train/val rows only; the manifest holds test rows")
    df = manifest[~manifest["image_id"].isin(set(quarantine))]
    singles = df[df["kind"] == "single"]
    train = singles[singles["split"] == "train"]
    counts = train["k_code"].value_counts()
    notes: List[str] = []
    classes = counts.index.to_series().reset_index(drop=True)
    ordered = classes.iloc[np.argsort(_rank(classes, seed, "class"), kind="stable")].tolist()
    n_classes = len(ordered) if spec.classes is None else min(spec.classes, len(ordered))
    if spec.classes is not None and spec.classes > len(ordered):
        notes.append(f"asked for {spec.classes} classes, only {len(ordered)} have training images")
    chosen = ordered[:n_classes]
    per_class = math.ceil(spec.images / n_classes) if spec.images and n_classes else None
    pool_train = train[train["k_code"].isin(chosen)]
    picked_train = pool_train if per_class is None else \
        _first_per_class(pool_train, pd.Series(per_class, index=chosen), seed)
    if spec.images and len(picked_train) < spec.images:
        notes.append(f"asked for {spec.images} training photos, the chosen classes have {len(picked_train)}")
    pool_val = singles[(singles["split"] == "val") & singles["k_code"].isin(chosen)]
    val_pool = pool_val["k_code"].value_counts()
    share = math.ceil(per_class * val_fraction / (1 - val_fraction)) if per_class else (int(val_pool.max()) if len(val_pool) else 0)
    quota = _val_quota(val_pool, spec.min_eval_samples, share)
    picked_val = _first_per_class(pool_val, pd.Series(quota, index=chosen), seed)
    if len(picked_val) < spec.min_eval_samples:
        notes.append(f"validation holds {len(picked_val)} photos, fewer than min_eval_samples="
                     f"{spec.min_eval_samples}: the {n_classes} classes have no more val photos")
    combos = df[(df["kind"] == "combination") & df["split"].isin(("train", "val"))]
    subset = pd.concat([picked_train, picked_val, combos]).sort_values(["split", "kind", "image_id"])
    subset = subset.reset_index(drop=True)
    per_class_counts = picked_train["k_code"].value_counts()
    chosen_set = set(chosen)
    in_scope = sum(bool(codes) and set(codes) <= chosen_set for codes in image_k_codes(combos))
    count = lambda split, kind: int(((subset["split"] == split) & (subset["kind"] == kind)).sum())  # noqa: E731
    summary = SubsetSummary(
        stage=stage, classes_requested=spec.classes, classes=n_classes, images_requested=spec.images,
        train_single=len(picked_train), val_single=len(picked_val),
        train_combination=count("train", "combination"), val_combination=count("val", "combination"),
        per_class_train_min=int(per_class_counts.min()) if len(per_class_counts) else 0,
        per_class_train_max=int(per_class_counts.max()) if len(per_class_counts) else 0,
        k_codes=sorted(chosen), subset_hash=manifest_hash(subset), val_hash=val_rows_hash(subset), notes=notes,
        min_eval_samples=spec.min_eval_samples, val_per_class=quota, combinations_in_scope=in_scope,
        imbalance_ratio=float(per_class_counts.max() / per_class_counts.min()) if len(per_class_counts) else None,
        detector_images_requested=spec.detector_images, classes_available=len(ordered),
        train_available=len(pool_train))
    return subset, summary


def write_subset(subset: pd.DataFrame, summary: SubsetSummary, exp_dir: Path) -> Path:
    out = layout.stage_data_dir(exp_dir, summary.stage)
    write_manifest(subset, out / "subset.csv")
    (out / "subset.json").write_text(json.dumps(asdict(summary), indent=1))
    return out


def val_rows_hash(rows: pd.DataFrame) -> str:
    """The row hash of a subset's validation photos (single and combination)."""
    return manifest_hash(rows[rows["split"] == "val"])


def read_subset(exp_dir: Path, stage: int, expected_hash: Optional[str] = None) -> tuple[pd.DataFrame, SubsetSummary]:
    """The stage's subset rows and summary, which must describe the same rows (a crash between writing the two, or
    a hand edit, is an error naming both hashes), and be `expected_hash` when the caller was given one."""
    out = layout.stage_data_dir(exp_dir, stage)
    summary = SubsetSummary(**json.loads((out / "subset.json").read_text()))
    rows = read_manifest(out / "subset.csv")
    actual = manifest_hash(rows)
    for what, want in (("its subset.json", summary.subset_hash), ("this run's subset", expected_hash)):
        if want is not None and actual != want:
            raise ArtifactChanged(f"{out / 'subset.csv'}: its rows hash to {actual}, {what} says {want}: the "
                                  f"stage's subset was rebuilt by another run; run `pillsnap subset --stage {stage}` "
                                  f"or the stage again")
    return rows, summary


def subset_changed(exp_dir: Path, stage: int, subset_hash: str) -> Optional[str]:
    """Why the subset on disk is not the one a (cached) result describes, or None when it is."""
    try:
        read_subset(exp_dir, stage, subset_hash)
    except (FileNotFoundError, ArtifactChanged) as e:
        return str(e)
    return None
