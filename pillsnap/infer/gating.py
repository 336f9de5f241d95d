"""Auto-mode routing (D-3): when does a whole-image classification fall back to detect-then-classify?

Two signals, checked in this order:
1. low_confidence     the whole-image top-1 probability (single_confidence) is below
                      inference.single_confidence_threshold: the classifier is unsure, so look for pills.
2. multi_object_hint  the photo seems to hold two or more pills. With a detector, the hint is its count of boxes
                      at the serving thresholds (those detections are reused for the combo path, never run twice).
                      Without one, an image-level heuristic counts foreground blobs (see `count_blobs`).
A confident single classification of a photo with one object stays single.

gating_score = single_confidence / max(1, objects): the single path's score after the object evidence; it is
below the threshold whenever the router chose combo for low confidence, and is divided by the pill count when
several pills were seen (a confident whole-image label for a multi-pill photo still describes one pill at best).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

HEURISTIC_SIDE = 128  # the photo is judged at this long side: blobs, not details
HEURISTIC_MIN_DIFF = 40  # a pixel is foreground when a channel differs this much from the border's median colour
HEURISTIC_MIN_AREA = 0.002  # a blob must cover this fraction of the frame ...
HEURISTIC_MIN_SHARE = 0.25  # ... and this fraction of the largest blob (noise and pill imprints are smaller)
LOW_CONFIDENCE, MULTI_OBJECT, MANUAL_COMBO = "low_confidence", "multi_object_hint", "manual_combo"


@dataclass(frozen=True)
class Route:
    mode_used: str  # single | combo
    reason: Optional[str]  # low_confidence | multi_object_hint | manual_combo | None (stayed single)
    gating_score: Optional[float]


def count_blobs(image: Image.Image) -> int:
    """Pills seen by a cheap image-level heuristic (no detector): foreground blobs against the background.

    Product photos show pills on a plain tray, so the border's median colour is the background; pixels far from
    it, closed to merge two-tone capsules and imprints, form connected blobs; blobs that are tiny in absolute
    terms or next to the largest one are noise. It misses pills coloured like the tray and merges touching
    pills: it only decides whether to look closer, the detector does the counting.
    """
    small = image.convert("RGB")
    small.thumbnail((HEURISTIC_SIDE, HEURISTIC_SIDE), Image.BILINEAR)
    pixels = np.asarray(small, dtype=np.int16)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = (np.abs(pixels - background).max(axis=2) > HEURISTIC_MIN_DIFF)
    mask = ndimage.binary_opening(ndimage.binary_closing(mask, iterations=2), iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0
    areas = np.bincount(labels.ravel())[1:]
    keep = (areas >= HEURISTIC_MIN_AREA * mask.size) & (areas >= HEURISTIC_MIN_SHARE * areas.max())
    return int(keep.sum())


def decide(mode: str, single_confidence: Optional[float], threshold: float, objects: Optional[int]) -> Route:
    """The route for one photo. `objects` is the pill count from the detector or the heuristic (None = unknown)."""
    if mode == "single":
        return Route("single", None, single_confidence)
    if mode == "combo":
        return Route("combo", MANUAL_COMBO, None)
    if mode != "auto":
        raise ValueError(f"mode={mode!r} is not one of ['single', 'combo', 'auto']")
    assert single_confidence is not None, "auto mode classifies the whole image first"
    score = single_confidence / max(1, objects or 1)
    if single_confidence < threshold:
        return Route("combo", LOW_CONFIDENCE, score)
    if objects is not None and objects >= 2:
        return Route("combo", MULTI_OBJECT, score)
    return Route("single", None, score)
