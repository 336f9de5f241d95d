"""How the classifier's pixel store keeps a row: raw uint8 or JPEG, and which one `dataloader.cache.format: auto` picks.

raw   S×S×3 bytes a row, written and read as arrays (no codec) in microseconds: 432 KB at 384 px, 1.09 TB for the release's 2.5M
      samples, more than a workstation's RAM (so every epoch would read the disk) and more than many disks.
jpeg  the same row encoded once at `dataloader.cache.jpeg_quality` with full-resolution colour (4:4:4: a pill's
      colour and a coloured imprint are what tell two drugs apart); decoded in the loader workers (~1-2 ms a row
      on one core, `bench/data_pipeline.py`). Lossy: on synthetic 384-px rows quality 90 differs from raw by
      ~0.7 grey levels on average (PSNR ~47 dB).
auto  raw while the rows fit in half of this machine's RAM and on the disk (the page cache then holds every
      epoch), jpeg beyond that. The choice is made once per experiment and recorded (`data.prepare`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Tuple

import numpy as np
from PIL import Image

FORMATS = ("auto", "raw", "jpeg")
RAW_RAM_SHARE = 0.5  # raw rows beyond this share of RAM leave the page cache: every epoch reads the disk
JPEG_RATIO_ESTIMATE = 10  # raw/jpeg before any row is stored: the low end for photos (synthetic ones reach ~45)


@dataclass(frozen=True)
class RowFormat:
    kind: str  # "raw" | "jpeg"
    quality: int = 90

    def __post_init__(self):
        if self.kind not in ("raw", "jpeg"):
            raise ValueError(f"pixel store format {self.kind!r}: expected raw or jpeg")

    @property
    def suffix(self) -> str:
        """The row files' suffix."""
        return ".u8" if self.kind == "raw" else ".jpg"

    @property
    def tag(self) -> str:
        """Part of the store's folder name: the rows of two formats (or qualities) are different pixels."""
        return "" if self.kind == "raw" else f"_jpeg{self.quality}"

    def encode(self, row: np.ndarray) -> bytes:
        """A JPEG row's bytes (raw rows are written as arrays, never encoded)."""
        out = io.BytesIO()
        Image.fromarray(row).save(out, "JPEG", quality=self.quality, subsampling=0)
        return out.getvalue()

    def decode(self, data, size: int) -> np.ndarray:
        """A JPEG row as a writable array (torch.from_numpy shares it with the batch)."""
        with Image.open(io.BytesIO(bytes(data))) as im:
            return np.array(im.convert("RGB"))

    def estimated_row_bytes(self, size: int) -> int:
        raw = size * size * 3
        return raw if self.kind == "raw" else raw // JPEG_RATIO_ESTIMATE


RAW = RowFormat("raw")


def choose_format(setting: str, quality: int, samples: int, size: int, ram_bytes: int,
                  free_bytes: int) -> Tuple[RowFormat, str]:
    """The format for a store of `samples` rows and the reason, with the numbers behind it."""
    if setting not in FORMATS:
        raise ValueError(f"dataloader.cache.format={setting!r}: expected one of {', '.join(FORMATS)}")
    if setting != "auto":
        return RowFormat(setting, quality), f"dataloader.cache.format={setting}"
    raw_bytes = samples * RAW.estimated_row_bytes(size)
    numbers = (f"{samples} samples x {size}px: raw {raw_bytes / 1e9:.1f} GB, RAM {ram_bytes / 1e9:.1f} GB, "
               f"free disk {free_bytes / 1e9:.1f} GB")
    if raw_bytes <= RAW_RAM_SHARE * ram_bytes and raw_bytes < free_bytes:
        return RAW, f"auto: raw, the rows fit in half of the RAM ({numbers})"
    return (RowFormat("jpeg", quality),
            f"auto: jpeg (quality {quality}, ~{JPEG_RATIO_ESTIMATE}x smaller), raw rows would not fit in half of "
            f"the RAM or on the disk ({numbers})")
