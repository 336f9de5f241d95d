"""Classification datasets and loaders: single-pill images (and optionally combination crops) -> tensors.

Samples come from the preprocessing cache when there is one, otherwise they are decoded on the fly. An
unreadable sample yields None and `safe_collate` drops it (and counts it), so one bad file never stops a run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pillsnap.config import DataloaderConfig
from pillsnap.data.cache import ImageCache, Sample, decode_sample
from pillsnap.data.class_map import ClassMap

log = logging.getLogger(__name__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassificationSamples:
    samples: List[Sample]
    labels: List[int]
    image_ids: List[str]


def classification_samples(rows: pd.DataFrame, class_map: ClassMap, include_crops: bool = False) -> ClassificationSamples:
    """Single images whole; combination pills as crops when asked. Labels from the ONE global class map."""
    samples, labels, ids = [], [], []
    for image_id, path, kind, k_code, boxes in zip(rows["image_id"], rows["image_path"], rows["kind"],
                                                    rows["k_code"], rows["boxes"]):
        if kind == "single":
            samples.append((path, None))
            labels.append(class_map.encode(k_code))
            ids.append(image_id)
        elif include_crops:
            for j, box in enumerate(json.loads(boxes or "[]")):
                samples.append((path, tuple(box["bbox"])))
                labels.append(class_map.encode(box["k_code"]))
                ids.append(f"{image_id}#{j}")
    return ClassificationSamples(samples, labels, ids)


def train_transform() -> v2.Compose:
    # The pill can sit anywhere in the frame, so no crop or large rotation that could cut it out (that
    # would be label noise); flips and 90° turns are lossless. Hue jitter stays small so colour classes
    # (e.g. 주황 vs 빨강) stay distinct.
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomAffine(degrees=0, translate=(0.04, 0.04), scale=(0.92, 1.08)),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.02),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class ClassificationDataset(Dataset):
    def __init__(self, data: ClassificationSamples, size: int, train: bool, cache: Optional[ImageCache] = None,
                 padding: float = 0.0):
        if cache is not None and len(cache) != len(data.samples):
            raise ValueError(f"cache holds {len(cache)} samples, dataset has {len(data.samples)}")
        self.data, self.size, self.cache, self.padding = data, size, cache, padding
        self.transform = train_transform() if train else eval_transform()

    def __len__(self) -> int:
        return len(self.data.samples)

    def pixels(self, i: int) -> Optional[np.ndarray]:
        if self.cache is not None:
            return self.cache.get(i)
        path, box = self.data.samples[i]
        try:
            return decode_sample(path, box, self.size, self.padding)
        except Exception as e:  # reported and skipped, never fatal
            log.warning("skipping unreadable image %s: %s", path, e)
            return None

    def __getitem__(self, key) -> Optional[Tuple[torch.Tensor, int, int]]:
        # key is an index, or (index, augmentation seed) from EpochSampler: augmentations are then a pure
        # function of (seed, epoch, sample), whatever the worker count or an interruption.
        i, seed = key if isinstance(key, tuple) else (key, None)
        pixels = self.pixels(i)
        if pixels is None:
            return None
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if seed is None:
            return self.transform(image), self.data.labels[i], i
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), self.data.labels[i], i


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, optionally starting mid-epoch (resume), yielding (index, aug_seed)."""

    def __init__(self, n: int, seed: int, weights: Optional[torch.Tensor] = None):
        self.n, self.seed, self.weights = n, seed, weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:  # weighted sampler: classes drawn in proportion to the given weights
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        base = (self.seed * 100_003 + self.epoch) * 1_000_003
        for pos, i in enumerate(self.order().tolist()[self.start:], start=self.start):
            yield int(i), (base + pos) % 2**63

    def __len__(self) -> int:
        return self.n - self.start


class SkipCounter:
    """How many samples `safe_collate` dropped (within this process)."""
    skipped = 0


def safe_collate(batch: Sequence[Optional[Tuple[torch.Tensor, int, int]]]):
    kept = [b for b in batch if b is not None]
    SkipCounter.skipped += len(batch) - len(kept)
    if not kept:
        return None
    images, labels, indices = zip(*kept)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def make_loader(dataset: Dataset, batch_size: int, cfg: DataloaderConfig, train: bool,
                sampler: Optional[torch.utils.data.Sampler] = None,
                num_workers: Optional[int] = None) -> DataLoader:
    workers = cfg.num_workers if num_workers is None else num_workers
    extra = {"persistent_workers": cfg.persistent_workers, "prefetch_factor": cfg.prefetch_factor} if workers else {}
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
        num_workers=workers, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        drop_last=train and cfg.drop_last and len(dataset) >= batch_size, collate_fn=safe_collate,
        **extra)
