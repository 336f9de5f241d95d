"""Decode-once pixel store: every sample resized to S×S uint8 RGB, one store per (size, crop padding) for ALL stages.

Decoding a 976×1280 PNG costs ~25 ms per core; reading a 384×384 row from a memmap costs microseconds. A sample
(photo path + optional crop box) is stored once, under a key of its path and box: Stage 3 and 4 reuse the rows
that Stage 1 and 2 decoded, and validation rows are shared with every later stage.

<cache_dir>/px<S>_pad<P>/pixels.u8     rows appended in order (S×S×3 bytes each)
<cache_dir>/px<S>_pad<P>/index.npz     keys (sha1 of "path|box"), valid flags, error texts: the commit record
Rows are appended first and the index is replaced atomically afterwards, so rows past the committed count (a
crash mid-build) are ignored and overwritten by the next build. A file lock keeps two builders apart.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pillsnap.progress import progress

log = logging.getLogger(__name__)

Box = Optional[Tuple[float, float, float, float]]
Sample = Tuple[str, Box]  # (image path, crop box or None for the whole image)
KEY_BYTES = 20
DISK_MARGIN_BYTES = 1 << 30  # keep 1 GiB free beyond the rows themselves


class CacheSpaceError(RuntimeError):
    """The disk cannot hold the rows a build needs; the message has the numbers."""


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


def sample_key(sample: Sample) -> bytes:
    """The manifest's paths are absolute already (the importers resolve them): no file-system call per sample."""
    path, box = sample
    return hashlib.sha1(f"{path}|{box}".encode()).digest()


def row_bytes(size: int) -> int:
    return size * size * 3


def store_dir(cache_dir: Path, size: int, padding: float) -> Path:
    return Path(cache_dir) / f"px{size}_pad{padding:g}"


@dataclass(frozen=True)
class CachePlan:
    """What a build of these samples would add to the store."""
    samples: int
    cached: int
    missing: int
    bytes_needed: int  # the missing rows
    bytes_on_disk: int  # what the store holds already
    free_bytes: int  # at the store's folder

    @property
    def fits(self) -> bool:
        return self.bytes_needed + DISK_MARGIN_BYTES <= self.free_bytes

    def describe(self) -> str:
        gb = 1e9
        return (f"{self.samples} samples, {self.cached} already cached, {self.missing} to decode = "
                f"{self.bytes_needed / gb:.2f} GB more (store holds {self.bytes_on_disk / gb:.2f} GB); "
                f"free {self.free_bytes / gb:.2f} GB")


class PixelStore:
    """Read side: rows(samples) -> row indices; get(row) -> HxWx3 uint8 or None when the photo was unreadable."""

    def __init__(self, cache_dir: Path, size: int, padding: float = 0.0):
        self.dir, self.size, self.padding = store_dir(cache_dir, size, padding), size, padding
        self.data_path, self.index_path = self.dir / "pixels.u8", self.dir / "index.npz"
        self.keys, self.valid = self._read_index()
        self._row_of = {k: i for i, k in enumerate(self.keys)}
        self._array: Optional[np.memmap] = None  # opened lazily, so the object pickles into workers cheaply

    def __getstate__(self):
        return {**self.__dict__, "_array": None, "_row_of": None}

    def __len__(self) -> int:
        return len(self.keys)

    def _read_index(self) -> Tuple[List[bytes], np.ndarray]:
        if not self.index_path.is_file():
            return [], np.zeros(0, dtype=bool)
        with np.load(self.index_path) as z:
            return [row.tobytes() for row in z["keys"]], z["valid"].astype(bool)

    def rows(self, samples: Sequence[Sample]) -> np.ndarray:
        """Row of each sample; -1 where the sample is not in the store."""
        return np.array([self._row_of.get(sample_key(s), -1) for s in samples], dtype=np.int64)

    def has(self, row: int) -> bool:
        return row >= 0 and bool(self.valid[row])

    def get(self, row: int) -> Optional[np.ndarray]:
        if not self.has(row):
            return None
        if self._array is None:
            self._array = np.memmap(self.data_path, dtype=np.uint8, mode="r",
                                    shape=(len(self.keys), self.size, self.size, 3))
        return np.array(self._array[row])

    def plan(self, samples: Sequence[Sample]) -> CachePlan:
        missing = len({sample_key(s) for s in samples} - set(self._row_of))
        on_disk = len(self.keys) * row_bytes(self.size)
        return CachePlan(len(samples), len(samples) - missing, missing, missing * row_bytes(self.size), on_disk,
                         shutil.disk_usage(_nearest_existing(self.dir)).free)

    # ------------------------------------------------------------------ building
    def ensure(self, samples: Sequence[Sample], workers: int = 0, show_progress: bool = True) -> np.ndarray:
        """Decode and append every sample not yet stored; returns the rows of `samples`."""
        with self._locked():
            self.keys, self.valid = self._read_index()  # another builder may have committed meanwhile
            self._row_of = {k: i for i, k in enumerate(self.keys)}
            todo, seen = [], set()
            for sample in samples:
                key = sample_key(sample)
                if key not in self._row_of and key not in seen:
                    seen.add(key)
                    todo.append((key, sample))
            if todo:
                self._append(todo, workers, show_progress)
        self._array = None
        return self.rows(samples)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _append(self, todo: List[Tuple[bytes, Sample]], workers: int, show_progress: bool) -> None:
        plan = self.plan([s for _, s in todo])
        if not plan.fits:
            raise CacheSpaceError(f"pixel cache {self.dir}: not enough disk for {plan.describe()}; free space, "
                                  "point dataloader.cache.dir at a larger disk, or lower classification.image_size")
        start, n = len(self.keys), len(todo)
        per_row = row_bytes(self.size)
        with open(self.data_path, "a+b") as f:  # drop an uncommitted tail, then grow to the new row count
            f.truncate((start + n) * per_row)
        chunk = 64
        jobs = [(self.data_path, start + n, self.size, self.padding, start + s, [smp for _, smp in todo[s:s + chunk]])
                for s in range(0, n, chunk)]
        valid = np.ones(n, dtype=bool)
        errors: List[str] = []
        with progress(total=n, desc=f"cache {self.size}px", unit="img", enabled=show_progress) as bar:
            with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
                for results in pool.map(_fill, jobs):
                    for row, err in results:
                        if err:
                            valid[row - start] = False
                            errors.append(err)
                    bar.update(len(results))
        for err in errors[:10]:
            log.warning("cache: skipped unreadable sample %s", err)
        self.keys = self.keys + [k for k, _ in todo]
        self.valid = np.concatenate([self.valid, valid])
        self._commit()
        self._row_of = {k: i for i, k in enumerate(self.keys)}
        log.info("pixel cache %s: +%d samples (%d unreadable), %d in all", self.dir, n, len(errors), len(self.keys))

    def _commit(self) -> None:
        tmp = self.index_path.with_name(f".index.{os.getpid()}.npz")
        # raw bytes, not an "S20" array: numpy strips trailing NUL bytes from those, and digests can end in one
        keys = np.frombuffer(b"".join(self.keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        np.savez(tmp, keys=keys, valid=self.valid)
        tmp.replace(self.index_path)  # the index appears last: its presence commits the rows it lists


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


def _nearest_existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
