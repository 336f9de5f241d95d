"""Inference preprocessing: the SAME pixels the classifier saw in training and validation.

Training decodes a sample with `pillsnap.data.cache.decode_sample` (RGB, optional padded crop, bilinear resize to
S×S) and normalises it with `pillsnap.data.augment.normalise`. Here the photo is decoded once and every crop is cut from it with
the same `padded_box` rule and the same resize, so a crop of a detected box matches a training crop of the same box.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pillsnap.data.augment import normalise
from pillsnap.data.cache import padded_box


def register_image_formats() -> None:
    """HEIC/HEIF (phone photos) for every PIL reader: pi-heif's decoder, registered once, up front. (ultralytics
    patches Image.open to install it on the first unknown file, which fails offline with a ModuleNotFoundError.)"""
    from pi_heif import register_heif_opener

    register_heif_opener()


register_image_formats()


def load_rgb(path: str | Path) -> Image.Image:
    """The photo as RGB, fully decoded (the file is closed when this returns)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure (ultralytics' HEIF hook raises ImportError too)
        raise FileNotFoundError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def to_bgr(image: Image.Image) -> np.ndarray:
    """HxWx3 uint8 BGR, the layout the detector's letterbox expects (as cv2.imread would give)."""
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def crop_pixels(image: Image.Image, box_xywh: Optional[Sequence[float]], size: int, padding: float) -> np.ndarray:
    """S×S×3 uint8: the whole image (box None) or the padded box, exactly as decode_sample makes it."""
    if box_xywh is not None:
        image = image.crop(padded_box(box_xywh, image.size, padding))
    return np.array(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalise_batch(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 3, S, S) float32, normalised with the validation transform."""
    if not pixels:
        raise ValueError("normalise_batch: no images")
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return normalise(batch).numpy()


def classifier_inputs(image: Image.Image, boxes_xywh: Sequence[Optional[Sequence[float]]], size: int,
                      padding: float) -> np.ndarray:
    return normalise_batch([crop_pixels(image, box, size, padding) for box in boxes_xywh])


class CropCountError(RuntimeError):
    """The classifier did not return one prediction per detected pill."""


def crop_detections(image_rgb: np.ndarray, boxes_xyxy: np.ndarray, padding: float, size: int) -> np.ndarray:
    """(K, size, size, 3) uint8: every box padded and resized as the classifier's training crops are."""
    image = Image.fromarray(image_rgb)
    crops = []
    for x1, y1, x2, y2 in boxes_xyxy[:, :4]:
        box = padded_box((float(x1), float(y1), float(x2 - x1), float(y2 - y1)), image.size, padding)
        crops.append(np.asarray(image.crop(box).resize((size, size), Image.BILINEAR), dtype=np.uint8))
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
