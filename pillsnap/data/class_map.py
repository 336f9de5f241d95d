"""ONE global class map (K-code -> index, sorted), built once from the whole training manifest.

Every split, stage, checkpoint and export uses it; a checkpoint records its hash, and a mismatch is an error.
It also carries what the labels say about each K-code (drug name, EDI codes, item_seq, company, shape, colours,
imprint), so a prediction can answer with the identifiers a pharmacy app looks up.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

import pandas as pd

from pillsnap.data.manifest import image_k_codes


class ClassMapError(ValueError):
    pass


@dataclass(frozen=True)
class ClassMap:
    index: Mapping[str, int]  # K-code -> class index
    info: Mapping[str, Mapping[str, Any]]  # K-code -> drug name and identifiers (see pillsnap.data.aihub.class_info)

    @classmethod
    def from_codes(cls, k_codes: Iterable[str], info: Mapping[str, Mapping[str, Any]] | None = None) -> "ClassMap":
        codes = sorted(set(k_codes))
        return cls({k: i for i, k in enumerate(codes)}, dict(info or {}))

    @property
    def names(self) -> Dict[str, str]:
        return {k: str(v.get("drug_name", "")) for k, v in self.info.items()}

    def restrict(self, k_codes: Iterable[str]) -> "ClassMap":
        """The label space of one stage: these K-codes (all in this map), re-indexed in sorted order."""
        codes = sorted(set(k_codes))
        unknown = [k for k in codes if k not in self.index]
        if unknown:
            raise ClassMapError(f"K-codes not in the class map: {unknown[:5]}")
        return ClassMap.from_codes(codes, {k: self.info[k] for k in codes if k in self.info})

    @property
    def k_codes(self) -> List[str]:
        return sorted(self.index, key=self.index.__getitem__)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.k_codes).encode()).hexdigest()[:16]

    def encode(self, k_code: str) -> int:
        try:
            return self.index[k_code]
        except KeyError:
            raise ClassMapError(f"K-code {k_code} is not in the class map ({len(self)} classes)") from None

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"hash": self.hash, "classes": dict(self.index), "info": dict(self.info)},
                                  ensure_ascii=False, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "ClassMap":
        path = Path(path)
        if not path.is_file():
            raise ClassMapError(f"class map not found: {path} (run `pillsnap import` first)")
        data = json.loads(path.read_text())
        info = data.get("info") or {k: {"drug_name": v} for k, v in data.get("names", {}).items()}  # older files
        cmap = cls(dict(data["classes"]), dict(info))
        if sorted(cmap.index.values()) != list(range(len(cmap))) or cmap.k_codes != sorted(cmap.index):
            raise ClassMapError(f"{path}: indices are not 0..N-1 in sorted K-code order")
        if data.get("hash") and data["hash"] != cmap.hash:
            raise ClassMapError(f"{path}: stored hash {data['hash']} != content hash {cmap.hash}")
        return cmap


def build_class_map(manifest: pd.DataFrame, info: Mapping[str, Mapping[str, Any]] | None = None) -> ClassMap:
    """Every K-code of every image of the manifest (single and each combination pill), train and val alike."""
    codes = {k for ks in image_k_codes(manifest) for k in ks}
    return ClassMap.from_codes(codes, info)


def check_same(expected_hash: str, cmap: ClassMap, what: str) -> None:
    if expected_hash != cmap.hash:
        raise ClassMapError(f"{what} was made with class map {expected_hash}, but the current class map is "
                            f"{cmap.hash} ({len(cmap)} classes): refusing to remap silently")
