"""Each model's training and validation data for one stage subset, shared by the loops and the tuners.

Worker autotuning needs the real data (pixel store included) but no model, so data is built apart from the units.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pillsnap.config import PillSnapConfig
from pillsnap.data.augment import BatchAugment
from pillsnap.data.class_map import ClassMap
from pillsnap.data.detector_store import DetectorStore, StoredImages
from pillsnap.data.cache import PixelStore
from pillsnap.data.prepare import cache_root, pixel_store
from pillsnap.data.datasets import (ClassificationDataset, ClassificationSamples, Collate, EpochSampler, RankSlice,
                                    classification_samples, make_loader)
from pillsnap.data.yolo_dataset import YoloDataset, stage_detector_dataset
from pillsnap.infer.detection import DetSample, StoredPhotos, detection_samples
from pillsnap.lock import wait_for_lock
from pillsnap.train.loss import sample_weights

LABELS_LOCK = ".labels.lock"  # in the stage's YOLO folder


@dataclass
class UnitData:
    """What a stream needs: the dataset, its seeded sampler, a loader factory and an epoch hook."""
    dataset: Any
    sampler: EpochSampler
    build_loader: Callable[[int, int], DataLoader]  # (batch_size, num_workers) -> loader over `sampler`
    num_workers: int
    drop_last: bool
    on_epoch: Optional[Callable[[int], bool]] = None  # before an epoch starts; True = the loader must be rebuilt


@dataclass
class ClassifierData:
    train_samples: ClassificationSamples
    val_samples: ClassificationSamples
    train: UnitData
    val_loader: DataLoader


def stage_label_space(subset: pd.DataFrame, class_map: ClassMap) -> ClassMap:
    """The global class map restricted to the classes of the subset's single-pill images."""
    return class_map.restrict(sorted({k for k in subset.loc[subset["kind"] == "single", "k_code"]}))


def classifier_samples(cfg: PillSnapConfig, subset: pd.DataFrame, labels: ClassMap, split: str) -> ClassificationSamples:
    return classification_samples(subset[subset["split"] == split], labels, cfg.data.include_combination_crops,
                                  cfg.classification.crop_padding)


def stage_samples(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap) -> List:
    """Every classifier sample (train and val) of a stage: what its pixel cache must hold."""
    labels = stage_label_space(subset, class_map)
    return [*classifier_samples(cfg, subset, labels, "train").samples, *classifier_samples(cfg, subset, labels, "val").samples]


def classifier_data(cfg: PillSnapConfig, subset: pd.DataFrame, labels: ClassMap, device: torch.device,
                    show_progress: bool = True, rank: int = 0, world: int = 1) -> ClassifierData:
    """Datasets over the pixel store; augmentation in the loader's workers on a CPU, on the device otherwise. The
    validation loader reads this rank's slice of the validation samples."""
    train_samples = classifier_samples(cfg, subset, labels, "train")
    val_samples = classifier_samples(cfg, subset, labels, "val")
    if not train_samples.samples:
        raise ValueError("the stage subset has no training images for the classifier")
    size, pad = cfg.classification.image_size, cfg.classification.crop_padding
    store, rows = None, [None, None]
    if cfg.dataloader.cache.enabled:
        store = pixel_store(cfg, len(train_samples.samples) + len(val_samples.samples))
        rows = [store.ensure(d.samples, show_progress=show_progress) for d in (train_samples, val_samples)]
    train_ds = ClassificationDataset(train_samples, size, store, rows[0], pad)
    if store is not None and not train_ds.cache_coverage()["cached"]:
        raise ValueError(f"none of the {len(train_samples.samples)} training photos could be read (the first: "
                         f"{train_samples.samples[0][0]}); see the warnings above")
    val_ds = ClassificationDataset(val_samples, size, store, rows[1], pad)
    weights = sample_weights(train_samples.labels, len(labels)) if cfg.loss.weighted_sampler else None
    sampler = EpochSampler(len(train_ds), cfg.train.seed, weights)
    on_cpu = device.type != "cuda"
    augment = BatchAugment(cfg.augment, size, len(labels), cfg.loss.label_smoothing,
                           crop_padding=cfg.classification.crop_padding) if on_cpu else None
    dl = cfg.dataloader

    def build(batch_size: int, workers: int) -> DataLoader:
        return make_loader(train_ds, batch_size, dl, True, sampler, workers, Collate(augment))

    # JPEG rows are decoded in loader workers that live for one validation only: persistent ones stayed alive
    # between validations, and the memory check (the process and its children) read them as a 2.5 GB leak.
    val_slice = RankSlice(len(val_ds), rank, world)
    val_loader = make_loader(val_ds, cfg.train.classification.batch_size, dl, False, val_slice,
                             val_loader_workers(len(val_slice), store, dl.num_workers),
                             Collate(normalise_only=on_cpu), persistent=False)
    train = UnitData(train_ds, sampler, build, dl.num_workers, dl.drop_last)
    return ClassifierData(train_samples, val_samples, train, val_loader)


# A loader worker costs ~1-3 s to start (a fresh interpreter importing torch) and a JPEG row ~1 ms to decode: below
# this many rows a worker would not pay for its start, and raw rows (a read, no decode) never repay one.
ROWS_PER_VAL_WORKER = 2000


def val_loader_workers(samples: int, store: Optional[PixelStore], workers: int) -> int:
    """Workers for one validation pass over `samples` rows: the decoding ones it pays to start, up to `workers`."""
    if store is None or store.fmt.kind != "jpeg":
        return 0 if store is not None else workers  # no store: every sample is a PNG decode
    return min(workers, samples // ROWS_PER_VAL_WORKER)


class SeededItems(torch.utils.data.Dataset):
    """Ultralytics' augmentations draw from the global `random` and `numpy.random` generators, whose state depends on
    the loader's worker, on when its iterator started and on whatever else draws from them. Seeding both from the
    sampler's (index, seed) pair before each item makes an augmented sample a function of its position, so a resume
    or an OOM replay sees the same detector batches as an uninterrupted run, with any number of workers."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        return self.dataset[index]


def _mosaic_partners_from_the_whole_dataset(transform: Any) -> None:
    """Ultralytics draws mosaic partners from a buffer of recently loaded images: what it holds depends on the load
    history (a resume starts empty, each loader worker keeps its own), so a resumed run would see other mosaics
    than an uninterrupted one. Drawing from the whole dataset keeps an augmented batch a function of its seed."""
    if hasattr(transform, "buffer_enabled"):
        transform.buffer_enabled = False
    for child in [*getattr(transform, "transforms", []), getattr(transform, "pre_transform", None)]:
        if child is not None:
            _mosaic_partners_from_the_whole_dataset(child)


@dataclass
class DetectorData:
    yolo: YoloDataset
    train: UnitData
    val_samples: List[DetSample]
    val_read: Optional[Callable[[int], Any]]  # validation's photos from the store (None: from their files)


def detector_data(cfg: PillSnapConfig, subset: pd.DataFrame, stage: int, hyp, epochs: int,
                  show_progress: bool = True) -> DetectorData:
    """The stage's YOLO dataset (one class "pill") through ultralytics' augmenting dataset, in our epoch order, its
    photos read from the decode-once detector store (with the pixel cache on)."""
    from ultralytics.data import build_yolo_dataset as ultralytics_dataset

    yolo, val_rows = stage_detector_dataset(cfg, subset, stage)
    # ultralytics writes labels/train.cache in place (unlink, then write): the ranks take turns, so the second
    # reads the first's whole file, never one half written.
    with wait_for_lock(Path(yolo.root) / LABELS_LOCK):
        dataset = ultralytics_dataset(hyp, yolo.train_list, cfg.train.detection.batch_size, yolo.ultralytics_data(),
                                      mode="train", stride=32)
    _mosaic_partners_from_the_whole_dataset(dataset.transforms)
    val_samples, val_read = detection_samples(val_rows), None
    if cfg.dataloader.cache.enabled:
        # the YOLO folder's links are named <image_id><ext>; the store is keyed by the original photos
        originals = {f"{i}{Path(p).suffix}": p for i, p in zip(subset["image_id"], subset["image_path"])}
        store = DetectorStore(cache_root(cfg), cfg.detection.image_size)
        train_photos = [(originals[Path(f).name], None) for f in dataset.im_files]
        rows = store.ensure([*train_photos, *((s.image_path, None) for s in val_samples)], show_progress=show_progress)
        dataset.load_image = StoredImages(dataset, store, rows[:len(train_photos)])
        val_read = StoredPhotos(val_samples, store, rows[len(train_photos):])
    sampler = EpochSampler(len(dataset), cfg.train.seed)
    dl = cfg.dataloader

    def build(batch_size: int, workers: int) -> DataLoader:
        return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=dataset.collate_fn, pin_memory=dl.pin_memory and torch.cuda.is_available(),
                          persistent_workers=bool(workers) and dl.persistent_workers)

    def close_mosaic(epoch: int) -> bool:
        if epoch >= epochs - cfg.detection.close_mosaic_epochs and getattr(dataset, "mosaic", False):
            dataset.close_mosaic(hyp)
            return True  # persistent workers hold their own copy of the dataset
        return False

    train = UnitData(dataset, sampler, build, dl.num_workers, False, close_mosaic)
    return DetectorData(yolo, train, val_samples, val_read)
