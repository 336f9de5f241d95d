"""The manifest: one row per image, the same schema for AIHub and plain-CSV sources.

Columns
  image_id    file stem (unique within a manifest)
  image_path  absolute path of the image file
  split       train | val   (the sealed test split lives in its own manifest, written only by the final test)
  kind        single | combination
  k_code      the pill's K-code for single images; "" for combination images
  boxes       JSON list of {"k_code": str, "bbox": [x, y, w, h]} in pixels; every pill has its own K-code
  width, height
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pandas as pd

COLUMNS = ["image_id", "image_path", "split", "kind", "k_code", "boxes", "width", "height"]
_DTYPES = {"image_id": str, "image_path": str, "split": str, "kind": str, "k_code": str, "boxes": str,
           "width": "int64", "height": "int64"}


class ManifestError(ValueError):
    pass


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES[c]) for c in COLUMNS})


def from_rows(rows: List[Dict]) -> pd.DataFrame:
    if not rows:
        return empty_manifest()
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype(_DTYPES)


def write_manifest(df: pd.DataFrame, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    df[COLUMNS].to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (run `pillsnap import` first)")
    df = pd.read_csv(path, dtype={c: t for c, t in _DTYPES.items() if t is str}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}")
    return df.astype(_DTYPES)


def boxes_of(row) -> List[Dict]:
    return json.loads(row["boxes"]) if row["boxes"] else []


def object_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per pill: image_id, split, kind, k_code, x, y, w, h (combination images give several rows)."""
    records = []
    for image_id, split, kind, boxes in zip(df["image_id"], df["split"], df["kind"], df["boxes"]):
        for box in json.loads(boxes) if boxes else []:
            x, y, w, h = box["bbox"]
            records.append((image_id, split, kind, box["k_code"], x, y, w, h))
    return pd.DataFrame(records, columns=["image_id", "split", "kind", "k_code", "x", "y", "w", "h"])


def image_k_codes(df: pd.DataFrame) -> pd.Series:
    """Every K-code an image shows: its own for singles, each pill's for combinations."""
    return pd.Series([[k] if kind == "single" else [b["k_code"] for b in json.loads(boxes or "[]")]
                      for kind, k, boxes in zip(df["kind"], df["k_code"], df["boxes"])], index=df.index)


def manifest_hash(df: pd.DataFrame) -> str:
    """Content hash of the rows (order-independent), used as a cache key for everything built from them."""
    rows = pd.util.hash_pandas_object(df[COLUMNS].astype(_DTYPES), index=False).to_numpy()
    return hashlib.sha256(np.sort(rows).tobytes() + str(len(df)).encode()).hexdigest()[:16]


def assign_splits(df: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Per-class stratified train/val split of single images, fixed once for every stage.

    Combination images are split by their combination folder (all photos of one combination on one side).
    Rows whose split is already set (from a CSV) keep it.
    """
    df = df.copy()
    rng = np.random.default_rng(seed)
    unset = df["split"].eq("")
    singles = df[unset & df["kind"].eq("single")]
    val_ids: List[str] = []
    for _, group in singles.sort_values("image_id").groupby("k_code", sort=True):
        n_val = int(round(len(group) * val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val_ids += rng.choice(group["image_id"].to_numpy(), size=n_val, replace=False).tolist()
    combos = df[unset & df["kind"].eq("combination")]
    folders = sorted({_combination_folder(i) for i in combos["image_id"]})
    n_val_folders = int(round(len(folders) * val_fraction))
    if len(folders) >= 2:  # like single images: both sides get at least one combination
        n_val_folders = min(max(n_val_folders, 1), len(folders) - 1)
    val_folders = set(rng.choice(folders, size=n_val_folders, replace=False).tolist()) if folders else set()
    val_ids += [i for i in combos["image_id"] if _combination_folder(i) in val_folders]
    df.loc[unset, "split"] = "train"
    df.loc[df["image_id"].isin(set(val_ids)) & unset, "split"] = "val"
    return df


def _combination_folder(image_id: str) -> str:
    return image_id.split("_", 1)[0]
