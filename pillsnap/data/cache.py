"""Decode-once pixel store: every sample resized to S×S uint8 RGB, one store per (size, crop padding, row format)
for ALL stages.

Decoding a 976×1280 PNG costs ~25 ms per core; reading a 384×384 row from a memmap costs microseconds. A sample
(photo path + optional crop box) is stored once, under a key of its path, box and the file's stamp (size and
modification time): Stage 3 and 4 reuse the rows that Stage 1 and 2 decoded, validation rows are shared with every
later stage, and a photo rewritten since it was decoded (truncated, replaced) is a new key, never its old pixels.

<cache_dir>/px<S>_pad<P>/pixels.u8     rows appended in order (S×S×3 bytes each) by training-time builds
<cache_dir>/px<S>_pad<P>/seg-<key>.u8  rows one data-preparation shard decoded (and seg-<key>.npz, its keys)
<cache_dir>/px<S>_pad<P>/index.npz     keys (sha1 of "path|box"), valid flags, each row's file, offset and
                                       length: the commit record
A JPEG store (`row_format`) lives in px<S>_pad<P>_jpeg<Q>/ with .jpg row files: one encoded row after another,
the index giving each row's byte offset and length.
Rows are written first and the index is replaced atomically afterwards, so rows past the committed count (a
crash mid-build) are ignored and overwritten by the next build. A file lock keeps two builders apart. Shards
running on other processes or machines write their own segment files, which a build adopts by reference (no copy).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pillsnap.core.identity import file_stamp
from pillsnap.data.row_format import RAW, RowFormat
from pillsnap.lock import wait_for_lock
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
        return sample_pixels(im.convert("RGB"), box, size, padding)


def sample_pixels(rgb: Image.Image, box: Box, size: int, padding: float = 0.0) -> np.ndarray:
    """One sample's row from an already decoded RGB photo: a photo decoded once serves all its samples."""
    if box is not None:
        rgb = rgb.crop(padded_box(box, rgb.size, padding))
    return np.array(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def photo_samples(path: str, kind: str, raw_boxes: str, include_crops: bool) -> List[Sample]:
    """The classifier samples one manifest photo gives, as `classification_samples` makes them: a single photo
    whole, a combination photo's pills as crops when asked. Data preparation fills their rows."""
    if kind == "single":
        return [(path, None)]
    return [(path, tuple(pill["bbox"])) for pill in json.loads(raw_boxes or "[]")] if include_crops else []


def padded_box(box: Sequence[float], image_size: Tuple[int, int], padding: float) -> Tuple[int, int, int, int]:
    x, y, w, h = box
    px, py = w * padding, h * padding
    width, height = image_size
    return (max(0, int(x - px)), max(0, int(y - py)), min(width, int(round(x + w + px))),
            min(height, int(round(y + h + py))))


def sample_key(sample: Sample, stamp: str) -> bytes:
    """`stamp`: the photo file's core.identity.file_stamp. The manifest's paths are absolute already (the importers
    resolve them)."""
    path, box = sample
    return hashlib.sha1(f"{path}|{box}|{stamp}".encode()).digest()


def sample_keys(samples: Sequence[Sample]) -> List[bytes]:
    """Every sample's key, its file stamped once per photo (a combination photo gives several samples)."""
    stamps: Dict[str, str] = {}
    return [sample_key(s, stamps.get(s[0]) or stamps.setdefault(s[0], file_stamp(s[0]))) for s in samples]


def row_bytes(size: int) -> int:
    return size * size * 3


def store_dir(cache_dir: Path, size: int, padding: float, fmt: RowFormat = RAW, prefix: str = "px") -> Path:
    return Path(cache_dir) / f"{prefix}{size}_pad{padding:g}{fmt.tag}"


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

    PREFIX = "px"  # the store's folder name starts with it: another kind of row is another store
    SPACE_HINT = ", lower classification.image_size, or set dataloader.cache.format=jpeg"  # when the disk is full
    decode = staticmethod(decode_sample)  # (path, box, size, padding) -> one row; module-level: pickled by name

    def __init__(self, cache_dir: Path, size: int, padding: float = 0.0, fmt: RowFormat = RAW):
        self.dir = store_dir(cache_dir, size, padding, fmt, self.PREFIX)
        self.size, self.padding, self.fmt = size, padding, fmt
        self.data_path, self.index_path = self.dir / f"pixels{fmt.suffix}", self.dir / "index.npz"
        self._load_index()
        self._files: Dict[int, int] = {}  # segment -> file descriptor, opened lazily (never pickled)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_row_of": None}

    def __del__(self):
        self._close()

    def __len__(self) -> int:
        return len(self.keys)

    def _load_index(self) -> None:
        """keys, valid, and where each row lives: segment (0 = pixels.*, else segment_names[i]), offset (a row
        number in raw files, a byte offset in JPEG files) and length in bytes."""
        self.keys: List[bytes] = []
        self.valid = np.zeros(0, dtype=bool)
        self.segment = np.zeros(0, dtype=np.int32)
        self.offset = np.zeros(0, dtype=np.int64)
        self.length = np.zeros(0, dtype=np.int64)
        self.segment_names: List[str] = [self.data_path.name]
        if self.index_path.is_file():
            with np.load(self.index_path) as z:
                self.keys = [row.tobytes() for row in z["keys"]]
                self.valid = z["valid"].astype(bool)
                if "segment" in z.files:  # an index from before segments: every row in pixels.u8, in order
                    self.segment, self.offset = z["segment"], z["offset"]
                    self.segment_names = [str(n) for n in z["segment_names"]]
                else:
                    self.segment = np.zeros(len(self.keys), dtype=np.int32)
                    self.offset = np.arange(len(self.keys), dtype=np.int64)
                self.length = z["length"] if "length" in z.files else np.full(len(self.keys), row_bytes(self.size))
        self._row_of = {k: i for i, k in enumerate(self.keys)}

    def rows(self, samples: Sequence[Sample], keys: Optional[Sequence[bytes]] = None) -> np.ndarray:
        """Row of each sample; -1 where the sample (as its file is now) is not in the store."""
        keys = sample_keys(samples) if keys is None else keys
        return np.array([self._row_of.get(k, -1) for k in keys], dtype=np.int64)

    def has(self, row: int) -> bool:
        return row >= 0 and bool(self.valid[row])

    def get(self, row: int) -> Optional[np.ndarray]:
        """The row, read with pread into a fresh array. Not a memory map: the pages a map touches count as the
        process's own memory (a 74 GB detector store read over an epoch looks like a leak of that size to the
        memory check); read this way they stay in the kernel's page cache, shared and reclaimable."""
        if not self.has(row):
            return None
        fd, offset, length = self._file(int(self.segment[row])), int(self.offset[row]), int(self.length[row])
        raw = self.fmt.kind == "raw"
        out = np.empty((self.size, self.size, 3) if raw else length, np.uint8)
        done = os.preadv(fd, [memoryview(out).cast("B")], offset * row_bytes(self.size) if raw else offset)
        if done != length:
            raise OSError(f"pixel store {self.dir / self.segment_names[int(self.segment[row])]}: row {row} is cut "
                          f"short ({done} of {length} bytes): the file changed after its index was written")
        return out if raw else self.fmt.decode(out, self.size)

    def _file(self, segment: int) -> int:
        fd = self._files.get(segment)
        if fd is None:
            fd = self._files[segment] = os.open(self.dir / self.segment_names[segment], os.O_RDONLY)
        return fd

    def _close(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)
        self._files = {}

    def bytes_on_disk(self) -> int:
        return int(self.length.sum())

    def row_bytes_expected(self) -> int:
        """A new row's bytes: exact for raw, the stored rows' mean for JPEG once there are enough of them."""
        stored = self.length[self.valid] if len(self.valid) else self.length
        if self.fmt.kind == "jpeg" and len(stored) >= 64:
            return int(stored.mean()) + 1
        return self.fmt.estimated_row_bytes(self.size)

    def plan(self, samples: Sequence[Sample], keys: Optional[Sequence[bytes]] = None) -> CachePlan:
        keys = sample_keys(samples) if keys is None else keys
        missing = len(set(keys) - set(self._row_of))
        return CachePlan(len(samples), len(samples) - missing, missing, missing * self.row_bytes_expected(),
                         self.bytes_on_disk(), shutil.disk_usage(nearest_existing(self.dir)).free)

    # ------------------------------------------------------------------ building
    def ensure(self, samples: Sequence[Sample], workers: int = 0, show_progress: bool = True) -> np.ndarray:
        """Decode and append every sample not yet stored; returns the rows of `samples`."""
        keys = sample_keys(samples)
        with wait_for_lock(self.dir / ".lock"):
            self._load_index()  # another builder may have committed meanwhile
            todo, seen = [], set()
            for key, sample in zip(keys, samples):
                if key not in self._row_of and key not in seen:
                    seen.add(key)
                    todo.append((key, sample))
            if todo:
                self._append(todo, workers, show_progress)
        self._close()
        return self.rows(samples, keys)

    def adopt(self, segments: Sequence[str]) -> int:
        """Add the rows of committed shard segments (seg-<key>) by reference; returns how many rows were new."""
        with wait_for_lock(self.dir / ".lock"):
            self._load_index()
            # joined once: 800+ segments
            valid, segment, offset, length = [self.valid], [self.segment], [self.offset], [self.length]
            before = len(self.keys)
            for name in segments:
                keys, flags, starts, sizes = read_segment(self.dir, name, self.size, self.fmt)
                file = f"{name}{self.fmt.suffix}"
                if file not in self.segment_names:
                    self.segment_names.append(file)
                number = self.segment_names.index(file)
                new = [i for i, k in enumerate(keys) if k not in self._row_of]
                for i in new:
                    self._row_of[keys[i]] = len(self.keys)
                    self.keys.append(keys[i])
                valid.append(flags[new])
                segment.append(np.full(len(new), number, dtype=np.int32))
                offset.append(starts[new])
                length.append(sizes[new])
            added = len(self.keys) - before
            if added:
                self.valid, self.segment, self.offset, self.length = (
                    np.concatenate(valid), np.concatenate(segment), np.concatenate(offset), np.concatenate(length))
                self._commit()
        self._close()
        return added

    def _append(self, todo: List[Tuple[bytes, Sample]], workers: int, show_progress: bool) -> None:
        plan = self.plan([s for _, s in todo], [k for k, _ in todo])
        if not plan.fits:
            raise CacheSpaceError(f"pixel cache {self.dir}: not enough disk for {plan.describe()}; free space, "
                                  f"point dataloader.cache.dir at a larger disk{self.SPACE_HINT}")
        main = self.segment == 0
        n, raw = len(todo), self.fmt.kind == "raw"
        # rows past the committed ones (a crash mid-build) are dropped: raw rows by number, JPEG rows by byte end
        start = int(main.sum()) if raw else int((self.offset[main] + self.length[main]).max(initial=0))
        with open(self.data_path, "a+b") as f:  # drop an uncommitted tail (and grow raw to the new row count)
            f.truncate((start + n) * row_bytes(self.size) if raw else start)
        chunk = 64
        jobs = [(self.decode, self.data_path, start + n, self.size, self.padding, self.fmt, start + s,
                 [smp for _, smp in todo[s:s + chunk]]) for s in range(0, n, chunk)]
        valid, errors = np.ones(n, dtype=bool), []
        offsets, lengths = np.arange(start, start + n, dtype=np.int64), np.full(n, row_bytes(self.size))
        with progress(total=n, desc=f"cache {self.size}px", unit="img", enabled=show_progress) as bar, \
                open(self.data_path, "ab") as out, \
                ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            written = 0
            for results in pool.map(_fill, jobs):
                for err, payload in results:
                    if err:
                        valid[written] = False
                        errors.append(err)
                    if not raw:  # encoded in the worker, appended here in order
                        offsets[written], lengths[written] = start, len(payload or b"")
                        start += out.write(payload or b"")
                    written += 1
                bar.update(len(results))
        for err in errors[:10]:
            log.warning("cache: skipped unreadable sample %s", err)
        self.keys = self.keys + [k for k, _ in todo]
        self.valid = np.concatenate([self.valid, valid])
        self.segment = np.concatenate([self.segment, np.zeros(n, dtype=np.int32)])
        self.offset = np.concatenate([self.offset, offsets])
        self.length = np.concatenate([self.length, lengths])
        self._commit()
        self._row_of = {k: i for i, k in enumerate(self.keys)}
        log.info("pixel cache %s: +%d samples (%d unreadable), %d in all", self.dir, n, len(errors), len(self.keys))

    def _commit(self) -> None:
        tmp = self.index_path.with_name(f".index.{os.getpid()}.npz")
        np.savez(tmp, keys=_key_array(self.keys), valid=self.valid, segment=self.segment, offset=self.offset,
                 length=self.length, segment_names=np.array(self.segment_names))
        tmp.replace(self.index_path)  # the index appears last: its presence commits the rows it lists


def _key_array(keys: Sequence[bytes]) -> np.ndarray:
    # raw bytes, not an "S20" array: numpy strips trailing NUL bytes from those, and digests can end in one
    return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)


# ---------------------------------------------------------------------- shard segments
def segment_rows(directory: Path, name: str, n: int, size: int) -> np.memmap:
    """A raw shard's own row file, n rows, opened for writing (created or resized)."""
    path = Path(directory) / f"{name}.u8"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.truncate(n * row_bytes(size))
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=(n, size, size, 3)) if n else np.zeros((0,))


def write_encoded_rows(directory: Path, name: str, payloads: Sequence[Optional[bytes]]) -> np.ndarray:
    """A JPEG shard's row file, written whole (an unreadable sample is 0 bytes); returns each row's length."""
    path = Path(directory) / f"{name}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for payload in payloads:
            f.write(payload or b"")
    return np.array([len(p or b"") for p in payloads], dtype=np.int64)


def commit_segment(directory: Path, name: str, keys: Sequence[bytes], valid: np.ndarray,
                   lengths: Optional[np.ndarray] = None) -> None:
    """The segment's keys (and a JPEG segment's row lengths), written after its rows: present = every row is in
    place."""
    path = Path(directory) / f"{name}.npz"
    tmp = path.with_name(f".{name}.{os.getpid()}.npz")
    np.savez(tmp, keys=_key_array(keys), valid=valid, **({} if lengths is None else {"length": lengths}))
    tmp.replace(path)


def segment_committed(directory: Path, name: str, fmt: RowFormat = RAW) -> bool:
    return (Path(directory) / f"{name}.npz").is_file() and (Path(directory) / f"{name}{fmt.suffix}").is_file()


def read_segment(directory: Path, name: str, size: int,
                 fmt: RowFormat = RAW) -> Tuple[List[bytes], np.ndarray, np.ndarray, np.ndarray]:
    """A committed segment's keys, valid flags, and each row's offset (row number or byte offset) and length."""
    if not segment_committed(directory, name, fmt):
        raise FileNotFoundError(f"pixel cache segment {Path(directory) / name}: not committed (its shard did not "
                                "finish); run the data preparation again")
    with np.load(Path(directory) / f"{name}.npz") as z:
        keys, valid = [row.tobytes() for row in z["keys"]], z["valid"].astype(bool)
        if fmt.kind == "raw":
            return keys, valid, np.arange(len(keys), dtype=np.int64), np.full(len(keys), row_bytes(size))
        lengths = z["length"].astype(np.int64)
    return keys, valid, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths


def _fill(args) -> List[Tuple[Optional[str], Optional[bytes]]]:
    """Decode some samples: raw rows are written into the row file here, JPEG rows returned encoded (their
    lengths are known only once encoded)."""
    decode, data_path, n, size, padding, fmt, start, samples = args
    out = np.memmap(data_path, dtype=np.uint8, mode="r+", shape=(n, size, size, 3)) if fmt.kind == "raw" else None
    results: List[Tuple[Optional[str], Optional[bytes]]] = []
    for offset, (path, box) in enumerate(samples):
        try:
            row = decode(path, box, size, padding)
        except Exception as e:  # a broken file is reported and skipped, never fatal
            results.append((f"{path}: {type(e).__name__}: {e}", None))
            continue
        if out is None:
            results.append((None, fmt.encode(row)))
        else:
            out[start + offset] = row
            results.append((None, None))
    if out is not None:
        out.flush()
    return results


def nearest_existing(path: Path) -> Path:
    """disk_usage needs an existing path; a store or experiment folder may not exist before its first run."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
