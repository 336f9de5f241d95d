"""Decode-once preprocessing cache: every sample resized to S×S uint8 RGB in one memory-mapped file.

Decoding a 976×1280 PNG costs ~25 ms per core; reading a 384×384 crop from a memmap costs microseconds,
so the cache is built once (in parallel, with a progress bar) and reused across epochs and stages. The key
hashes the sample list and size; a file is only visible under its final name once complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pillsnap.progress import progress

log = logging.getLogger(__name__)

Box = Optional[Tuple[float, float, float, float]]
Sample = Tuple[str, Box]  # (image path, crop box or None for the whole image)


def decode_sample(path: str, box: Box, size: int, padding: float = 0.0) -> np.ndarray:
    """The RGB pixels of one sample resized to size×size (whole image, or the padded box)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(padded_box(box, im.size, padding))
        return np.array(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def padded_box(box: Sequence[float], image_size: Tuple[int, int], padding: float) -> Tuple[int, int, int, int]:
    x, y, w, h = box
    px, py = w * padding, h * padding
    width, height = image_size
    return (max(0, int(x - px)), max(0, int(y - py)), min(width, int(round(x + w + px))),
            min(height, int(round(y + h + py))))


def cache_key(samples: Sequence[Sample], size: int, padding: float) -> str:
    h = hashlib.sha256(f"{size}:{padding}".encode())
    for path, box in samples:
        h.update(f"{path}|{box}\n".encode())
    return h.hexdigest()[:16]


class ImageCache:
    """Read side: `get(i)` -> HxWx3 uint8 array, or None when the sample could not be decoded."""

    def __init__(self, data_path: Path, meta: dict):
        self.path = Path(data_path)
        self.size = meta["size"]
        self.valid = np.array(meta["valid"], dtype=bool)
        self._array: Optional[np.memmap] = None  # opened lazily so the object pickles into workers cheaply

    def __len__(self) -> int:
        return len(self.valid)

    def __getstate__(self):
        return {**self.__dict__, "_array": None}

    def get(self, i: int) -> Optional[np.ndarray]:
        if not self.valid[i]:
            return None
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(len(self), self.size, self.size, 3))
        return np.array(self._array[i])


def _fill(args) -> List[Tuple[int, Optional[str]]]:
    data_path, n, size, padding, start, samples = args
    out = np.memmap(data_path, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    results = []
    for offset, (path, box) in enumerate(samples):
        try:
            out[start + offset] = decode_sample(path, box, size, padding)
            results.append((start + offset, None))
        except Exception as e:  # a broken file is reported and skipped, never fatal
            results.append((start + offset, f"{path}: {type(e).__name__}: {e}"))
    out.flush()
    return results


def build_cache(samples: Sequence[Sample], size: int, cache_dir: Path, padding: float = 0.0,
                workers: int = 0, show_progress: bool = True) -> ImageCache:
    """Open the cache for these samples, building it first if needed."""
    cache_dir = Path(cache_dir)
    key = cache_key(samples, size, padding)
    data_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    if data_path.is_file() and meta_path.is_file():
        return ImageCache(data_path, json.loads(meta_path.read_text()))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_path.with_suffix(f".u8.{os.getpid()}.tmp")
    n = len(samples)
    np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size, 3)).flush()
    chunk = 64
    jobs = [(tmp, max(n, 1), size, padding, s, list(samples[s:s + chunk])) for s in range(0, n, chunk)]
    valid = [False] * n
    errors: List[str] = []
    with progress(total=n, desc=f"cache {size}px", unit="img", enabled=show_progress) as bar:
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for results in pool.map(_fill, jobs):
                for i, err in results:
                    valid[i] = err is None
                    if err:
                        errors.append(err)
                bar.update(len(results))
    for err in errors[:10]:
        log.warning("cache: skipped unreadable sample %s", err)
    meta = {"size": size, "count": n, "valid": valid, "errors": errors, "padding": padding}
    tmp.replace(data_path)
    meta_tmp = meta_path.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps(meta))
    meta_tmp.replace(meta_path)  # the meta file appears last: its presence means the data file is complete
    log.info("built preprocessing cache %s: %d samples, %d unreadable", data_path, n, len(errors))
    return ImageCache(data_path, meta)
