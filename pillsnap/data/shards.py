"""Data preparation in shards: validation and the first pixel-cache fill share ONE decode per photo.

A shard is a slice of a few thousand manifest photos. Each is inspected once: its bytes are read and hashed
(duplicates across splits), decoded fully (truncated files are caught), its size compared with the label, and,
when the cache is filled, every classifier sample it gives is cut from that decoded image and written to the
shard's own pixel-cache segment, and a combination photo (a detector photo at every stage) is also fitted into the
detector's store (pillsnap.data.detector_store). Separately, validation and the caches each decoded every photo.

A shard is named by the hash of its photos (each one's path, label size, samples, and file size + modification
time: a truncated or replaced photo makes its shard new) and the settings. Its result is written under
<data>/shards/ and its rows to the store's seg-<key> files, both committed last, so a shard that finished is never
redone (also by another process or machine sharing the folder) and one that did not leaves nothing that is read.
Bad photos are findings, never errors; anything else raised while inspecting a photo fails the shard with the
photo named.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pillsnap.core.identity import file_stamp
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.cache import (Sample, commit_segment, photo_samples, sample_key, sample_pixels, segment_committed,
                                 segment_rows, store_dir, write_encoded_rows)
from pillsnap.data.detector_store import DetectorStore, decode_bgr, fitted_row
from pillsnap.data.row_format import RAW, RowFormat

Check = Tuple[Optional[str], Optional[str]]  # (what is wrong with the photo or None, sha1 of its bytes or None)
CHUNK = 64  # photos per process-pool job inside a shard


class ShardError(RuntimeError):
    """A shard stopped on something that is not a property of the photo; the message names the photo."""


@dataclass(frozen=True)
class ShardSettings:
    """What a shard's result depends on besides its photos."""
    check_images: bool
    hash_duplicates: bool
    cache_dir: Optional[str]  # the classifier's pixel cache to fill, or None: validation only
    size: int
    padding: float
    include_crops: bool
    fmt: RowFormat = RAW  # how the cache keeps a row
    detector_size: int = 0  # > 0: combination photos also fill the detector store at this size (in cache_dir)

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def decodes(self) -> bool:
        return self.check_images or self.cache_dir is not None


class Photo(NamedTuple):  # a tuple: millions are made when the release is planned
    path: str
    width: int
    height: int
    samples: Tuple[Sample, ...]
    stamp: str  # the file's size and modification time when planned (core.identity.file_stamp)
    combination: bool = False  # a combination photo with boxes: a detector photo at every stage


@dataclass(frozen=True)
class Shard:
    index: int
    first: int  # the manifest row of its first photo
    photos: Tuple[Photo, ...]
    key: str

    def describe(self) -> str:
        return f"shard {self.index} (manifest rows {self.first}-{self.first + len(self.photos) - 1})"

    @property
    def segment(self) -> str:
        return f"seg-{self.key}"


def manifest_photos(manifest: pd.DataFrame, include_crops: bool) -> List[Photo]:
    """Every manifest photo with the classifier samples it gives and its file's stamp, in manifest order (one
    stat per photo: ~10 s for the release's 2.47M on a local disk)."""
    columns = [manifest[c].tolist() for c in ("image_path", "kind", "boxes", "width", "height")]
    return [Photo(path, int(w), int(h), tuple(photo_samples(path, kind, boxes, include_crops)), file_stamp(path),
                  kind == "combination" and len(boxes or "") > 2)  # "[]" has no box
            for path, kind, boxes, w, h in zip(*columns)]


def plan_shards(manifest: pd.DataFrame, settings: ShardSettings, shard_size: int) -> List[Shard]:
    return shard_photos(manifest_photos(manifest, settings.include_crops), settings, shard_size)


def files_identity(shards: Sequence[Shard]) -> str:
    """One hash of every shard's key: the photos' files as they are now, for the key of the whole report."""
    return hashlib.sha1("|".join(s.key for s in shards).encode()).hexdigest()[:20]


def shard_photos(photos: Sequence[Photo], settings: ShardSettings, shard_size: int) -> List[Shard]:
    """Consecutive slices of the manifest's photos; each keyed by the hash of its photos (their files' stamps
    included) and the settings."""
    if shard_size < 1:
        raise ValueError(f"data.prepare.shard_size={shard_size}: must be >= 1")
    shards = []
    for index, first in enumerate(range(0, len(photos), shard_size)):
        part = tuple(photos[first:first + shard_size])
        h = hashlib.sha1(settings.fingerprint().encode())
        for p in part:
            h.update(f"{p.path}|{p.width}|{p.height}|{p.samples}|{p.stamp}|{p.combination}\n".encode())
        shards.append(Shard(index, first, part, h.hexdigest()[:20]))
    return shards


def fills_detector(photo: Photo, settings: ShardSettings) -> bool:
    return photo.combination and settings.detector_size > 0 and settings.cache_dir is not None


class Inspected(NamedTuple):
    check: Check
    rows: List[Optional[np.ndarray]]  # its classifier samples' rows (None where unreadable)
    detector_row: Optional[np.ndarray]  # its detector store row, when it fills one and is readable


def inspect_photo(photo: Photo, settings: ShardSettings) -> Inspected:
    """One read, one hash, one decode: the photo's check and its rows."""
    no_rows: List[Optional[np.ndarray]] = [None] * len(photo.samples)
    try:
        data = Path(photo.path).read_bytes()
    except OSError as e:
        return Inspected((f"cannot read: {e}", None), no_rows, None)
    digest = hashlib.sha1(data).hexdigest() if settings.hash_duplicates else None
    if not settings.decodes:
        return Inspected((None, digest), no_rows, None)
    if not data:
        return Inspected(("empty file (0 bytes)", digest), no_rows, None)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size, lossless_rgb = im.size, im.format == "PNG" and im.mode == "RGB"
            rgb = im.convert("RGB") if settings.cache_dir is not None else None
    except UnidentifiedImageError:  # its message holds the address of the in-memory buffer: not repeatable
        return Inspected(("cannot decode: UnidentifiedImageError: not an image format Pillow can read", digest),
                         no_rows, None)
    except Exception as e:  # PIL raises many types for broken files
        return Inspected((f"cannot decode: {type(e).__name__}: {e}", digest), no_rows, None)
    rows = [sample_pixels(rgb, box, settings.size, settings.padding) for _, box in photo.samples] if rgb else no_rows
    detector_row = None
    if fills_detector(photo, settings):
        # an 8-bit RGB PNG decodes to the same pixels in Pillow and OpenCV (lossless): reuse this decode; other
        # files go through OpenCV as ultralytics reads them (its JPEG decoder and EXIF rotation are its own)
        try:
            if lossless_rgb:  # resized, then reordered: each channel is resized alone, and the copy is 3x smaller
                detector_row = cv2.cvtColor(fitted_row(np.asarray(rgb), settings.detector_size), cv2.COLOR_RGB2BGR)
            else:
                detector_row = fitted_row(decode_bgr(np.frombuffer(data, np.uint8), photo.path), settings.detector_size)
        except ValueError:  # Pillow reads it, OpenCV does not: no row (ultralytics will not read it either)
            pass
    error = None
    if settings.check_images and tuple(size) != (photo.width, photo.height):
        error = f"size_mismatch: file is {size[0]}x{size[1]}, label says {photo.width}x{photo.height}"
    return Inspected((error if settings.check_images else None, digest), rows, detector_row)


class ChunkResult(NamedTuple):
    checks: List[Check]
    valid: List[bool]  # per classifier sample
    encoded: List[Optional[bytes]]  # JPEG rows, in order
    detector_valid: List[bool]  # per photo filling the detector store


def _inspect_chunk(args) -> ChunkResult:
    """Some photos of a shard. Raw rows go to the shard's segments from the given offsets on; JPEG rows come back
    encoded, for the shard to write in order (their lengths are known only once encoded)."""
    shard_name, segment, segment_samples, settings, photos, sample_offset, detector_rows, detector_offset = args
    raw = settings.cache_dir is not None and settings.fmt.kind == "raw"
    out = segment_rows(_store(settings), segment, segment_samples, settings.size) if raw else None
    detector_out = (segment_rows(_detector_store(settings), segment, detector_rows, settings.detector_size)
                    if detector_rows else None)
    checks, valid, encoded, detector_valid = [], [], [], []
    for photo in photos:
        try:
            check, rows, detector_row = inspect_photo(photo, settings)
            checks.append(check)
            if fills_detector(photo, settings):
                if detector_row is not None:
                    detector_out[detector_offset] = detector_row
                detector_valid.append(detector_row is not None)
                detector_offset += 1
            for row in rows:
                if out is not None and row is not None:
                    out[sample_offset] = row
                elif settings.cache_dir is not None and not raw:
                    encoded.append(None if row is None else settings.fmt.encode(row))
                valid.append(row is not None)
                sample_offset += 1
        except Exception as e:  # not a property of the photo (memory, a bug, the disk): the shard fails
            raise ShardError(f"{shard_name}: {photo.path}: {type(e).__name__}: {e}") from e
    for rows_out in (out, detector_out):
        if rows_out is not None and len(rows_out):
            rows_out.flush()
    return ChunkResult(checks, valid, encoded, detector_valid)


def _store(settings: ShardSettings) -> Path:
    return store_dir(Path(settings.cache_dir), settings.size, settings.padding, settings.fmt)


def _detector_store(settings: ShardSettings) -> Path:
    return store_dir(Path(settings.cache_dir), settings.detector_size, 0.0, RAW, DetectorStore.PREFIX)


def detector_photos(shard: Shard, settings: ShardSettings) -> List[Photo]:
    return [p for p in shard.photos if fills_detector(p, settings)]


def result_path(results_dir: Path, shard: Shard) -> Path:
    return Path(results_dir) / f"validate-{shard.key}.json"


def shard_finished(shard: Shard, settings: ShardSettings, results_dir: Path) -> bool:
    """Its result and (when it fills the cache) its rows are committed."""
    return result_path(results_dir, shard).is_file() and (
        settings.cache_dir is None or segment_committed(_store(settings), shard.segment, settings.fmt)) and (
        not detector_photos(shard, settings) or segment_committed(_detector_store(settings), shard.segment))


def run_shard(shard: Shard, settings: ShardSettings, results_dir: Path, workers: int = 1) -> Dict:
    """Inspect a shard's photos (unless a finished result is on disk); returns where its result is."""
    path = result_path(results_dir, shard)
    filled = settings.cache_dir is not None
    if shard_finished(shard, settings, results_dir):
        done = read_json(path)
        return _summary(shard, path, done["checks"], computed=False, settings=settings, worker=done["worker"])
    jobs, offset, total = [], 0, sum(len(p.samples) for p in shard.photos)
    fitted, fitted_total = 0, len(detector_photos(shard, settings))
    for start in range(0, len(shard.photos), CHUNK):
        part = shard.photos[start:start + CHUNK]
        jobs.append((shard.describe(), shard.segment, total, settings, part, offset, fitted_total, fitted))
        offset += sum(len(p.samples) for p in part)
        fitted += sum(1 for p in part if fills_detector(p, settings))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            done = list(pool.map(_inspect_chunk, jobs))
    else:
        done = [_inspect_chunk(job) for job in jobs]
    checks = [c for part in done for c in part.checks]
    if filled:
        keys = [sample_key(s, p.stamp) for p in shard.photos for s in p.samples]
        lengths = (None if settings.fmt.kind == "raw" else
                   write_encoded_rows(_store(settings), shard.segment, [e for part in done for e in part.encoded]))
        commit_segment(_store(settings), shard.segment, keys, np.array([v for part in done for v in part.valid], bool),
                       lengths)
    if fitted_total:  # the detector store keys a photo as the whole-photo sample (path, None)
        commit_segment(_detector_store(settings), shard.segment,
                       [sample_key((p.path, None), p.stamp) for p in detector_photos(shard, settings)],
                       np.array([v for part in done for v in part.detector_valid], bool))
    worker = f"{socket.gethostname()}:{os.getpid()}"
    # last: a result on disk means the shard finished
    write_json_atomic(path, {"shard": shard.index, "first": shard.first, "worker": worker, "checks": checks})
    return _summary(shard, path, checks, computed=True, settings=settings, worker=worker)


def _summary(shard: Shard, path: Path, checks: Sequence[Check], computed: bool, settings: ShardSettings,
             worker: str) -> Dict:
    samples = sum(len(p.samples) for p in shard.photos) if settings.cache_dir is not None else 0
    fitted = bool(detector_photos(shard, settings))
    return {"shard": shard.index, "first": shard.first, "photos": len(shard.photos), "result": str(path),
            "worker": worker,
            "segment": shard.segment if samples else None, "bad_photos": sum(1 for err, _ in checks if err),
            "cached_samples": samples, "detector_segment": shard.segment if fitted else None, "computed": computed}


def read_checks(summaries: Sequence[Dict], photos: int) -> List[Check]:
    """Every photo's check in manifest order, from the shards' results (which must cover the manifest)."""
    checks: List[Optional[Check]] = [None] * photos
    for s in summaries:
        part = read_json(s["result"])["checks"]
        checks[s["first"]:s["first"] + len(part)] = [tuple(c) for c in part]
    missing = [i for i, c in enumerate(checks) if c is None]
    if missing:
        raise ValueError(f"shard results cover {photos - len(missing)} of {photos} photos (the first missing: "
                         f"manifest row {missing[0]})")
    return checks  # type: ignore[return-value]
