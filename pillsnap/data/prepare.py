"""Data preparation steps over the experiment directory: import, validate, build a stage subset.

Each step reads what the previous one wrote under <exp_dir>/data/ and returns a small, serialisable summary,
so the CLI and the orchestration tasks call the same functions.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd
import psutil

from pillsnap.config import PillSnapConfig
from pillsnap.data.aihub import ImportIssue, ImportResult, assemble_split, import_aihub, training_split
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.data.cache import DISK_MARGIN_BYTES, PixelStore, nearest_existing, sample_key
from pillsnap.data.detector_store import DetectorStore
from pillsnap.data.class_map import build_class_map
from pillsnap.data.csv_import import import_csv
from pillsnap.core import layout
from pillsnap.data.manifest import assign_splits, manifest_hash, read_manifest, write_manifest
from pillsnap.data.label_shards import LabelShard, plan_label_shards, read_label_parts
from pillsnap.data.shards import Photo, Shard, ShardSettings, manifest_photos, read_checks, run_shard, shard_photos
from pillsnap.data.row_format import RowFormat, choose_format
from pillsnap.data.subsets import build_stage_subset, write_subset
from pillsnap.progress import progress
from pillsnap.data.validate import (load_quarantine, raise_if_fatal, release_classes, validate_manifest,
                                   write_photo_hashes, write_report)

log = logging.getLogger(__name__)


def data_dir(cfg: PillSnapConfig) -> Path:
    return layout.data_dir(cfg.exp_dir)


def manifest_path(cfg: PillSnapConfig) -> Path:
    return data_dir(cfg) / "manifest.csv"


def class_map_path(cfg: PillSnapConfig) -> Path:
    return data_dir(cfg) / "class_map.json"


def cache_root(cfg: PillSnapConfig) -> Path:
    return Path(cfg.dataloader.cache.dir or data_dir(cfg) / "cache")


def pixel_store(cfg: PillSnapConfig, samples: Optional[int] = None) -> PixelStore:
    """The experiment's decode-once pixel store at the classifier's size, crop padding and row format (shared by
    stages). `samples`: what the caller will store, counted where no manifest was imported (`store_format`)."""
    c = cfg.classification
    return PixelStore(cache_root(cfg), c.image_size, c.crop_padding, store_format(cfg, samples=samples)[0])


def store_format_path(cfg: PillSnapConfig) -> Path:
    return data_dir(cfg) / "cache_format.json"


def store_format(cfg: PillSnapConfig, ram_bytes: Optional[int] = None, free_bytes: Optional[int] = None,
                 samples: Optional[int] = None) -> Tuple[RowFormat, str]:
    """The pixel store's row format and why. `auto` is decided once per experiment, from the manifest's sample
    count (or, with no manifest imported, the `samples` a caller is about to store), this machine's RAM and the
    cache's disk, and recorded: every later stage, process and node then reads the same store (another machine's
    RAM would otherwise pick another one)."""
    c = cfg.dataloader.cache
    if c.format != "auto":
        return choose_format(c.format, c.jpeg_quality, 0, 0, 0, 0)
    record = store_format_path(cfg)
    if record.is_file():
        chosen = read_json(record)
        if chosen["format"] == "raw" or chosen["quality"] == c.jpeg_quality:
            return RowFormat(chosen["format"], c.jpeg_quality), f"{chosen['why']} (recorded in {record})"
    if samples is None or manifest_path(cfg).is_file():
        samples = manifest_samples(read_manifest(manifest_path(cfg)), cfg.data.include_combination_crops)
    fmt, why = choose_format("auto", c.jpeg_quality, samples, cfg.classification.image_size,
                             psutil.virtual_memory().total if ram_bytes is None else ram_bytes,
                             disk_free(cache_root(cfg)) if free_bytes is None else free_bytes)
    write_json_atomic(record, {"format": fmt.kind, "quality": fmt.quality, "why": why, "samples": samples})
    log.info("pixel store format: %s", why)
    return fmt, why


def manifest_samples(manifest: pd.DataFrame, include_crops: bool) -> int:
    """The classifier samples the manifest gives: each single photo, and each pill of a combination photo when
    crops are included."""
    single = manifest["kind"] == "single"
    crops = int(manifest.loc[~single, "boxes"].str.count('"bbox"').sum()) if include_crops else 0
    return int(single.sum()) + crops


def disk_free(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def source_root(cfg: PillSnapConfig) -> Path:
    return Path(cfg.synth.out_dir if cfg.data.source == "synthetic" else cfg.paths.data_root)


def run_import(cfg: PillSnapConfig, show_progress: bool = True) -> Dict:
    """Import the training data (never the sealed test split) in this process; the flows parse the AIHub labels in
    shards instead (`plan_import`)."""
    if cfg.data.source == "csv":
        if not cfg.paths.manifest_csv:
            raise ValueError("data.source=csv needs paths.manifest_csv")
        result: ImportResult = import_csv(Path(cfg.paths.manifest_csv), show_progress=show_progress)
    else:
        result = import_aihub(source_root(cfg), show_progress=show_progress)
    return finish_import(cfg, result)


def plan_import(cfg: PillSnapConfig) -> List[LabelShard]:
    """The label-file shards of the AIHub training split (an AIHub or synthetic source; a CSV is one file)."""
    return plan_label_shards(training_split(source_root(cfg)), cfg.data.prepare.shard_size)


def import_from_shards(cfg: PillSnapConfig, summaries: Sequence[Dict]) -> Dict:
    return finish_import(cfg, assemble_split(training_split(source_root(cfg)), "", read_label_parts(summaries)))


def finish_import(cfg: PillSnapConfig, result: ImportResult) -> Dict:
    """Fix the train/val split, write the manifest, the class map and the import issues."""
    if result.manifest.empty:
        raise ValueError(f"no images imported from {source_root(cfg)}; issues: "
                         f"{[(i.kind, i.path) for i in result.issues[:5]]}")
    manifest = assign_splits(result.manifest, cfg.data.val_fraction, cfg.data.seed)
    write_manifest(manifest, manifest_path(cfg))
    cmap = build_class_map(manifest, result.info)
    cmap.save(class_map_path(cfg))
    result.issues_frame().to_json(data_dir(cfg) / "import_issues.jsonl", orient="records", lines=True,
                                  force_ascii=False)
    summary = {"manifest": str(manifest_path(cfg)), "class_map": str(class_map_path(cfg)),
               "manifest_hash": manifest_hash(manifest), "class_map_hash": cmap.hash, "images": len(manifest),
               "classes": len(cmap), "issues": len(result.issues)}
    log.info("import: %d images, %d classes, %d issues -> %s", len(manifest), len(cmap), len(result.issues),
             manifest_path(cfg))
    return summary


def import_issues(cfg: PillSnapConfig) -> List[ImportIssue]:
    """The training import's issues (import_issues.jsonl)."""
    path = data_dir(cfg) / "import_issues.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    frame = pd.read_json(path, orient="records", lines=True, dtype=str)
    return [ImportIssue(r["kind"], r["path"], r.get("detail", "")) for r in frame.to_dict("records")]


# What each step's result depends on besides the manifest (the cache keys of the data tasks).
VALIDATION_KEYS = ("data.validation",)
# Validation's shards also fill the classifier's pixel cache: its size, padding, samples and place.
PREPARE_KEYS = (*VALIDATION_KEYS, "data.prepare", "data.include_combination_crops", "classification.image_size",
                "detection.enabled", "detection.image_size",
                "classification.crop_padding", "dataloader.cache")


def subset_keys(stage: int) -> Tuple[str, ...]:
    """run_subset's result: these and the manifest (its quarantine comes from the validation rules)."""
    return (f"data.stages.{stage}", "data.seed", "data.val_fraction", *VALIDATION_KEYS)


def photo_hashes_path(cfg: PillSnapConfig) -> Path:
    """The sha1 of every train/val photo's bytes, as validation read them (the final test looks for twins)."""
    return data_dir(cfg) / "photo_sha1.npy"


def shard_results_dir(cfg: PillSnapConfig) -> Path:
    return layout.shard_results_dir(cfg.exp_dir)


def plan_validation(cfg: PillSnapConfig) -> Tuple[List[Shard], ShardSettings, str]:
    """The manifest's shards and what they do: validation always, the first pixel-cache fill when the cache is on
    and its disk holds every sample of the manifest (else each stage fills its own rows when it trains)."""
    photos = manifest_photos(read_manifest(manifest_path(cfg)), cfg.data.include_combination_crops)  # parsed once
    v, c = cfg.data.validation, cfg.classification
    store = pixel_store(cfg)
    fill, why = cfg.dataloader.cache.enabled and cfg.data.prepare.fill_cache, "filled by validation's decode"
    if not fill:
        why = "not filled by validation (dataloader.cache.enabled or data.prepare.fill_cache is false)"
    else:
        plan = store.plan([s for photo in photos for s in photo.samples],
                          [sample_key(s, photo.stamp) for photo in photos for s in photo.samples])
        if not plan.fits:
            fill, why = False, (f"not filled by validation: the disk cannot hold the manifest's rows "
                                f"({plan.describe()}); each stage fills its own rows when it trains")
            log.warning("pixel cache %s", why)
    detector_size = 0
    if fill and cfg.detection.enabled:
        detector_size, note = detector_fill(cfg, photos, plan.bytes_needed)
        why = f"{why}; {note}"
    settings = ShardSettings(v.check_images, v.hash_duplicates, str(store.dir.parent.resolve()) if fill else None,
                             c.image_size, c.crop_padding, cfg.data.include_combination_crops, store.fmt,
                             detector_size)
    return shard_photos(photos, settings, cfg.data.prepare.shard_size), settings, why


def detector_fill(cfg: PillSnapConfig, photos: Sequence[Photo], classifier_bytes: int) -> Tuple[int, str]:
    """The detector store's size for validation to fill its combination photos (a detector photo at every stage;
    the single photos a stage's detector takes depend on its subset, so its training fills those), or 0 where the
    disk cannot also hold them."""
    store = DetectorStore(cache_root(cfg), cfg.detection.image_size)
    combos = [p for p in photos if p.combination]
    plan = store.plan([(p.path, None) for p in combos], [sample_key((p.path, None), p.stamp) for p in combos])
    if plan.bytes_needed + classifier_bytes + DISK_MARGIN_BYTES > plan.free_bytes:
        log.warning("detector store: not filled by validation: the disk cannot hold its %d combination photos "
                    "beside the classifier's rows (%s)", plan.missing, plan.describe())
        return 0, "the detector store's combination photos are left to each stage's training (disk)"
    return cfg.detection.image_size, f"the detector store's {len(combos)} combination photos too"


def finish_validation(cfg: PillSnapConfig, summaries: Sequence[Dict], cache_note: str) -> Dict:
    """The report from every shard's checks; the shards' cache rows adopted; raise if a fatal threshold is crossed."""
    manifest = read_manifest(manifest_path(cfg))
    checks, issues = read_checks(summaries, len(manifest)), import_issues(cfg)
    report = validate_manifest(manifest, cfg.data.validation, issues, checks)
    paths = write_report(report, data_dir(cfg))
    if cfg.data.validation.hash_duplicates:  # without it no bytes were hashed: no list, rather than an empty one
        write_photo_hashes(checks, photo_hashes_path(cfg))
    else:
        photo_hashes_path(cfg).unlink(missing_ok=True)
    lost = release_classes(manifest, report.quarantine, issues)["lost"]
    if lost:
        log.warning("validation: %d class(es) have no usable training photo: %s", len(lost),
                    "; ".join(f"{k}: {why}" for k, why in list(lost.items())[:5]))
    ordered = sorted(summaries, key=lambda s: s["shard"])
    segments = [s["segment"] for s in ordered if s["segment"]]
    adopted = pixel_store(cfg).adopt(segments) if segments else 0
    fitted = [s["detector_segment"] for s in ordered if s.get("detector_segment")]
    detector_adopted = (DetectorStore(cache_root(cfg), cfg.detection.image_size).adopt(fitted) if fitted else 0)
    computed = sum(1 for s in summaries if s["computed"])
    log.info("validation: %s (%d shards: %d computed, %d finished before); pixel cache %s: %d new rows, detector "
             "store %d new rows", "FAIL" if report.fatal else "PASS", len(summaries), computed,
             len(summaries) - computed, cache_note, adopted, detector_adopted)
    raise_if_fatal(report)
    return {"report": str(paths["json"]), "summary": str(paths["summary"]), "quarantine": len(report.quarantine),
            "findings": report.finding_counts(), "counts": report.counts,
            "imbalance_ratio": report.imbalance_ratio, "val_only_classes": len(report.val_only_classes),
            "lost_classes": lost,
            "manifest_hash": manifest_hash(manifest),
            "shards": {"total": len(summaries), "computed": computed},
            "pixel_cache": {"note": cache_note, "rows_added": adopted, "detector_rows_added": detector_adopted}}


def validation_workers(cfg: PillSnapConfig) -> int:
    """Processes inspecting one shard's photos on this machine."""
    return cfg.data.validation.workers or os.cpu_count() or 1


def run_validation(cfg: PillSnapConfig, show_progress: bool = True) -> Dict:
    """Validate the manifest in this process (every shard in turn over a process pool); the flows map the same
    shards on a task runner. Writes the report and quarantine list; raises if a fatal threshold is crossed."""
    shards, settings, cache_note = plan_validation(cfg)
    workers = validation_workers(cfg)
    summaries = []
    with progress(total=sum(len(s.photos) for s in shards), desc="validate images", unit="img",
                  enabled=show_progress) as bar:
        for shard in shards:
            summaries.append(run_shard(shard, settings, shard_results_dir(cfg), workers))
            bar.update(len(shard.photos))
    return finish_validation(cfg, summaries, cache_note)


def run_subset(cfg: PillSnapConfig, stage: int) -> Dict:
    manifest = read_manifest(manifest_path(cfg))
    quarantine = load_quarantine(data_dir(cfg) / "quarantine.json")
    subset, summary = build_stage_subset(manifest, stage, cfg.stage(stage), cfg.data.seed, quarantine,
                                         cfg.data.val_fraction)
    out = write_subset(subset, summary, cfg.exp_dir)
    for note in summary.notes:
        log.warning("stage %d subset: %s", stage, note)
    log.info("stage %d subset: %d classes, train %d single + %d combination, val %d single (%d per class, gate "
             "%d) + %d combination (%d with every pill in the stage's classes)", stage, summary.classes,
             summary.train_single, summary.train_combination, summary.val_single, summary.val_per_class,
             summary.min_eval_samples, summary.val_combination, summary.combinations_in_scope)
    result = asdict(summary)
    result.pop("k_codes")
    return {**result, "dir": str(out)}
