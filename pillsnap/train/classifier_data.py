"""The classifier's training and validation data for one stage subset (shared by the trainer and the tuners).

Worker autotuning needs the real dataset (cache included) but no model, so building the data is a function of
its own rather than part of the trainer's constructor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.cache import ImageCache, build_cache
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import ClassificationDataset, ClassificationSamples, EpochSampler, classification_samples
from pillsnap.train.loss import sample_weights


@dataclass
class ClassifierData:
    train_data: ClassificationSamples
    val_data: ClassificationSamples
    train_ds: ClassificationDataset
    val_ds: ClassificationDataset
    sampler: EpochSampler


def stage_label_space(subset: pd.DataFrame, class_map: ClassMap) -> ClassMap:
    """The global class map restricted to the classes of the subset's single-pill images."""
    return class_map.restrict(sorted({k for k in subset.loc[subset["kind"] == "single", "k_code"]}))


def build_classifier_data(cfg: PillSnapConfig, subset: pd.DataFrame, labels: ClassMap,
                          show_progress: bool = True) -> ClassifierData:
    include_crops = cfg.data.include_combination_crops
    train_data = classification_samples(subset[subset["split"] == "train"], labels, include_crops)
    val_data = classification_samples(subset[subset["split"] == "val"], labels, include_crops)
    if not train_data.samples:
        raise ValueError("the stage subset has no training images for the classifier")
    size, pad = cfg.classification.image_size, cfg.classification.crop_padding
    caches: List[Optional[ImageCache]] = [None, None]
    if cfg.dataloader.cache.enabled:
        cache_dir = Path(cfg.dataloader.cache.dir or cfg.exp_dir / "data" / "cache")
        caches = [build_cache(d.samples, size, cache_dir, pad, show_progress=show_progress)
                  for d in (train_data, val_data)]
    train_ds = ClassificationDataset(train_data, size, True, caches[0], pad)
    val_ds = ClassificationDataset(val_data, size, False, caches[1], pad)
    weights = sample_weights(train_data.labels, len(labels)) if cfg.loss.weighted_sampler else None
    return ClassifierData(train_data, val_data, train_ds, val_ds, EpochSampler(len(train_ds), cfg.train.seed, weights))
