"""The detector's decode-once store: every training photo as ultralytics' training loads it, decoded once.

ultralytics' `load_image` reads the PNG (30-60 ms for 976×1280) and resizes its long side to
`detection.image_size` every time a sample or a mosaic partner is drawn: 4 decodes per mosaic sample, every epoch.
This store keeps that result (BGR, long side resized with cv2's INTER_LINEAR exactly as ultralytics does it) at the
top-left of an S×S uint8 row, keyed like the classifier's store by the ORIGINAL photo's path and file stamp, so
Stages 1-4 reuse the rows whatever their YOLO folder is called. `StoredImages` answers ultralytics' `load_image`
from it: the same pixels, so every augmentation of the recipe (mosaic, HSV, flips, affine, close_mosaic) is
unchanged and a seeded sample is the same sample. Raw rows only: JPEG would change the detector's pixels.

<cache_dir>/det<S>_pad0/   the same layout and commit rules as pillsnap.data.cache
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import cv2
import numpy as np

from pillsnap.data.cache import Box, PixelStore


def fitted_shape(h0: int, w0: int, size: int) -> Tuple[int, int]:
    """(h, w) of a photo whose long side ultralytics resizes to `size` (its rounding: ceil, capped at size)."""
    r = size / max(h0, w0)
    return (h0, w0) if r == 1 else (min(math.ceil(h0 * r), size), min(math.ceil(w0 * r), size))


def fit_long_side(path: str, box: Box, size: int, padding: float = 0.0) -> np.ndarray:
    """One row: the photo read as ultralytics reads it (BGR), resized as its training resizes it, top-left."""
    return fitted_row(decode_bgr(np.fromfile(path, np.uint8), path), size)


def decode_bgr(data: np.ndarray, path: str) -> np.ndarray:
    """A photo's bytes decoded as ultralytics' `imread` decodes them."""
    im = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if im is None:
        raise ValueError(f"{path}: not an image OpenCV can decode")
    return im


def fitted_row(im: np.ndarray, size: int) -> np.ndarray:
    """A decoded BGR photo as a store row: long side resized as ultralytics' training resizes it, top-left."""
    h, w = fitted_shape(*im.shape[:2], size)
    if (h, w) != im.shape[:2]:
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    row = np.zeros((size, size, 3), np.uint8)
    row[:h, :w] = im
    return row


class DetectorStore(PixelStore):
    PREFIX = "det"
    SPACE_HINT = ", or lower detection.image_size"
    decode = staticmethod(fit_long_side)

    def __init__(self, cache_dir, size: int):
        super().__init__(cache_dir, size, 0.0)


class StoredImages:
    """ultralytics' `load_image` for one YOLO dataset, answered from the store (set as the dataset's attribute,
    so it pickles into the loader workers with it). What the store lacks (an unreadable photo, a mode other than
    training's long-side resize) goes to ultralytics' own method."""

    def __init__(self, dataset: Any, store: DetectorStore, rows: Sequence[int]):
        self.dataset, self.store, self.rows = dataset, store, np.asarray(rows, dtype=np.int64)

    def __call__(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        d = self.dataset
        row = int(self.rows[i])
        if d.ims[i] is not None or not rect_mode or resize_short or not self.store.has(row):
            return type(d).load_image(d, i, rect_mode, resize_short)
        h0, w0 = d.labels[i]["shape"]
        h, w = fitted_shape(h0, w0, self.store.size)
        im = np.ascontiguousarray(self.store.get(row)[:h, :w])
        if d.augment and d.cache != "ram":  # ultralytics' own bookkeeping of recently loaded photos
            d.ims[i], d.im_hw0[i], d.im_hw[i] = im, (h0, w0), (h, w)
            d.buffer.append(i)
            if 1 < len(d.buffer) >= d.max_buffer_length:
                j = d.buffer.pop(0)
                d.ims[j], d.im_hw0[j], d.im_hw[j] = None, None, None
        return im, (h0, w0), (h, w)
