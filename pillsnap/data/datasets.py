"""Classification datasets and loaders: single-pill images (and optionally combination crops) -> uint8 batches.

A dataset item is the sample's S×S×3 uint8 pixels (from the pixel store, or decoded on the fly), its label,
index, augmentation seed and pill box. `Collate` stacks items into a batch dict (NCHW, channels-last in memory);
augmentation runs on the whole batch
(pillsnap.data.augment): inside the loader's workers on a CPU machine, on the GPU after the copy otherwise.
An unreadable sample yields None and is dropped (and counted), so one bad file never stops a run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from pillsnap.config import DataloaderConfig
from pillsnap.data.augment import BatchAugment, normalise
from pillsnap.data.cache import PixelStore, Sample, decode_sample, padded_box
from pillsnap.data.class_map import ClassMap

log = logging.getLogger(__name__)
PillBox = Tuple[float, float, float, float]  # (cx, cy, w, h) as fractions of the sample frame; w = h = 0: unknown
NO_BOX: PillBox = (0.5, 0.5, 0.0, 0.0)
Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClassificationSamples:
    samples: List[Sample]
    labels: List[int]
    image_ids: List[str]
    pill_boxes: List[PillBox]


def _whole_image_box(bbox: Sequence[float], width: int, height: int) -> PillBox:
    x, y, w, h = bbox
    return ((x + w / 2) / width, (y + h / 2) / height, w / width, h / height)


def _crop_box(bbox: Sequence[float], width: int, height: int, padding: float) -> PillBox:
    """Where the pill sits inside its padded crop (the crop is clipped at the photo's border)."""
    x0, y0, x1, y1 = padded_box(bbox, (width, height), padding)
    x, y, w, h = bbox
    cw, ch = max(1, x1 - x0), max(1, y1 - y0)
    return ((x + w / 2 - x0) / cw, (y + h / 2 - y0) / ch, w / cw, h / ch)


def classification_samples(rows: pd.DataFrame, class_map: ClassMap, include_crops: bool = False,
                           padding: float = 0.0) -> ClassificationSamples:
    """Single images whole; combination pills as crops when asked. Labels from the ONE global class map."""
    samples, labels, ids, boxes = [], [], [], []
    for image_id, path, kind, k_code, raw, width, height in zip(
            rows["image_id"], rows["image_path"], rows["kind"], rows["k_code"], rows["boxes"], rows["width"],
            rows["height"]):
        pills = json.loads(raw or "[]")
        if kind == "single":
            samples.append((path, None))
            labels.append(class_map.encode(k_code))
            ids.append(image_id)
            boxes.append(_whole_image_box(pills[0]["bbox"], width, height) if pills else NO_BOX)
        elif include_crops:
            for j, pill in enumerate(pills):
                samples.append((path, tuple(pill["bbox"])))
                labels.append(class_map.encode(pill["k_code"]))
                ids.append(f"{image_id}#{j}")
                boxes.append(_crop_box(pill["bbox"], width, height, padding))
    return ClassificationSamples(samples, labels, ids, boxes)


class ClassificationDataset(Dataset):
    """Items: (uint8 S×S×3, label, index, seed, pill box) or None for an unreadable sample."""

    def __init__(self, data: ClassificationSamples, size: int, store: Optional[PixelStore] = None,
                 rows: Optional[np.ndarray] = None, padding: float = 0.0):
        if store is not None and (rows is None or len(rows) != len(data.samples)):
            raise ValueError(f"pixel store rows ({None if rows is None else len(rows)}) do not match the "
                             f"{len(data.samples)} samples")
        self.data, self.size, self.store, self.rows, self.padding = data, size, store, rows, padding

    def __len__(self) -> int:
        return len(self.data.samples)

    def cache_coverage(self) -> Dict[str, int]:
        """How many samples the pixel store serves (the rest are unreadable, or decoded per read without a store)."""
        cached = 0 if self.store is None else int(sum(self.store.has(int(r)) for r in self.rows))
        return {"samples": len(self), "cached": cached, "store": int(self.store is not None)}

    def pixels(self, i: int) -> Optional[np.ndarray]:
        if self.store is not None:
            return self.store.get(int(self.rows[i]))
        path, box = self.data.samples[i]
        try:
            return decode_sample(path, box, self.size, self.padding)
        except Exception as e:  # reported and skipped, never fatal
            log.warning("skipping unreadable image %s: %s", path, e)
            return None

    def __getitem__(self, key):
        # key is an index, or (index, augmentation seed) from EpochSampler.
        i, seed = key if isinstance(key, tuple) else (key, 0)
        pixels = self.pixels(i)
        if pixels is None:
            return None
        return torch.from_numpy(pixels), self.data.labels[i], i, seed, self.data.pill_boxes[i]


class RankSlice(torch.utils.data.Sampler):
    """Positions rank, rank + world, ...: with every rank validating its slice, each sample is seen exactly once
    (no padding, unlike torch's DistributedSampler, so gathered counts equal one process's)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, optionally starting mid-epoch (resume, OOM replay).

    Yields (index, augmentation seed) pairs, or plain indices with `with_seeds=False` (datasets that take an int).
    The seed of a position depends only on (seed, epoch, position), so augmentations do not depend on the
    worker count or on an interruption. With a shard (rank, world size, batch) it yields only the rank's slice of
    every global batch of world x batch positions, so the ranks together see the positions one process would.
    """

    def __init__(self, n: int, seed: int, weights: Optional[torch.Tensor] = None, with_seeds: bool = True):
        self.n, self.seed, self.weights, self.with_seeds = n, seed, weights, with_seeds
        self.epoch, self.start = 0, 0
        self.rank, self.world, self.batch = 0, 1, 1

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def set_shard(self, rank: int, world: int, batch: int) -> None:
        self.rank, self.world, self.batch = rank, world, max(1, batch)

    def _mine(self, pos: int) -> bool:
        return self.world == 1 or ((pos - self.start) // self.batch) % self.world == self.rank

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:  # weighted sampler: classes drawn in proportion to the given weights
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        base = (self.seed * 100_003 + self.epoch) * 1_000_003
        for pos, i in enumerate(self.order().tolist()[self.start:], start=self.start):
            if self._mine(pos):
                yield (int(i), (base + pos) % 2**63) if self.with_seeds else int(i)

    def __len__(self) -> int:
        span, window = self.n - self.start, self.batch * self.world  # this rank's batch-sized part of each window
        return span // window * self.batch + min(self.batch, max(0, span % window - self.rank * self.batch))


class SkipCounter:
    """How many samples `Collate` dropped (within this process)."""
    skipped = 0


class Collate:
    """Items -> a batch dict {images, targets, indices, seeds, boxes}; drops unreadable items.

    With `augment` the batch is augmented and normalised here (in the loader's worker: the CPU path); with
    `normalise_only` it is normalised; otherwise `images` stays uint8 and the consumer finishes it on its device
    (`finish_batch`).
    """

    def __init__(self, augment: Optional[BatchAugment] = None, normalise_only: bool = False):
        self.augment, self.normalise_only = augment, normalise_only

    def __call__(self, items: Sequence) -> Optional[Batch]:
        kept = [b for b in items if b is not None]
        SkipCounter.skipped += len(items) - len(kept)
        if not kept:
            return None
        images, labels, indices, seeds, boxes = zip(*kept)
        # NCHW shape over NHWC memory (channels-last): no per-image transposition anywhere on the way
        batch = {"images": torch.stack(images).permute(0, 3, 1, 2), "targets": torch.tensor(labels),
                 "indices": torch.tensor(indices),
                 "seeds": torch.tensor(seeds, dtype=torch.int64), "boxes": torch.tensor(boxes, dtype=torch.float32)}
        return finish_batch(batch, self.augment) if (self.augment or self.normalise_only) else batch


def finish_batch(batch: Batch, augment: Optional[BatchAugment]) -> Batch:
    """uint8 images -> normalised float (augmented when `augment` is given); a finished batch passes through."""
    if batch["images"].dtype != torch.uint8:
        return batch
    out = dict(batch)
    if augment is None:
        out["images"] = normalise(batch["images"])
    else:
        out["images"], out["targets"] = augment(batch["images"], batch["seeds"], batch["boxes"], batch["targets"])
    return out


def make_loader(dataset: Dataset, batch_size: int, cfg: DataloaderConfig, train: bool,
                sampler: Optional[torch.utils.data.Sampler] = None, num_workers: Optional[int] = None,
                collate: Optional[Collate] = None, persistent: Optional[bool] = None) -> DataLoader:
    """`persistent`: keep the workers between passes (default: dataloader.persistent_workers)."""
    workers = cfg.num_workers if num_workers is None else num_workers
    keep = cfg.persistent_workers if persistent is None else persistent
    extra = {"persistent_workers": keep, "prefetch_factor": cfg.prefetch_factor} if workers else {}
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
        num_workers=workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        drop_last=train and cfg.drop_last and len(dataset) >= batch_size, collate_fn=collate or Collate(),
        **extra)
