"""Input pipeline throughput against naive per-sample PNG decode, measured in the same run.

A benchmark, not a test. It writes ~200 synthetic single-pill photos at the real 976x1280 resolution
(pillsnap.data.synth) into a temp dir, then times, through the same DataLoader settings (passes alternate,
the median pass counts):
  naive          a plain torch Dataset that opens, decodes, resizes and normalises each PNG on every access;
  warm cache     the pixel store (pillsnap.data.cache; its build is timed apart, per 1,000 images) read by
                 ClassificationDataset, normalised per batch: the validation loader;
  warm jpeg      the same from a JPEG store (dataloader.cache.format=jpeg, quality --quality): each row decoded
                 in the loader (the release's format: 1.09 TB of raw rows do not stay in RAM);
  train augment  the same loader with the training augmentation of the shipped config (augment.* defaults:
                 quarter turns, free rotation + scale + shift with the pill kept in frame, colour jitter)
                 applied to the whole uint8 batch in the loader, as on a machine without CUDA;
  uint8 batches  the training loader of a CUDA run: its workers collate uint8 batches and the step augments them
                 on the GPU (what `make gpu-check` compares with the images/s the training step consumes);
  uint8 jpeg     the same from the JPEG store: what one loader worker feeds a GPU at the release's format;
  per-sample v2  information: the same augmentation kind done per image with torchvision v2 transform objects
                 (what the loader did before augmentation moved to batches);
  detector PNG   the detector's training samples (ultralytics' recipe at detection.image_size 640: mosaic of 4
                 photos, HSV, flips, affine) as the loader made them before the detector store: every photo and
                 mosaic partner decoded from its PNG;
  detector store the same samples, the photos read from the decode-once detector store (its build timed apart).
Targets: warm cache >= 10x naive, train augment >= 10x naive, warm jpeg >= 0.5x warm cache (and its bytes per row),
detector store >= 10x detector PNG.

    .venv/bin/python bench/data_pipeline.py [--images 200] [--size 384] [--workers 0] [--passes 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TARGET = 10.0
JPEG_TARGET = 0.5
INFORMATION = ("per-sample v2", "uint8 batches", "uint8 jpeg")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=384, help="classifier input size (the cache stores SxS)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, the same for both sides")
    p.add_argument("--passes", type=int, default=2, help="timed passes per side (alternating)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in this process (DataLoader workers run with 1 as well)")
    p.add_argument("--quality", type=int, default=90, help="the JPEG store's quality")
    p.add_argument("--json", type=Path, help="also write the rates to this file (make gpu-check reads it)")
    return p.parse_args()


def synthetic_photos(root: Path, count: int) -> List[str]:
    from pillsnap.config import SynthConfig
    from pillsnap.data.synth import synthesize

    classes = 20
    cfg = SynthConfig(num_classes=classes, images_per_class=max(1, count // classes), test_images_per_class=0,
                      combinations=0, test_combinations=0, width=976, height=1280, workers=0)
    synthesize(cfg, root, show_progress=False)
    return sorted(str(p) for p in root.rglob("*.png"))


class NaiveDataset(torch.utils.data.Dataset):
    """What a first implementation does: decode and resize the full-size PNG on every access."""

    def __init__(self, paths: List[str], labels: List[int], size: int, transform=None):
        self.paths, self.labels, self.size, self.transform = paths, labels, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        with Image.open(self.paths[i]) as im:
            pixels = np.array(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        from pillsnap.data.augment import normalise
        return normalise(image[None])[0], self.labels[i], i


class CachedPerSample(torch.utils.data.Dataset):
    """The store's pixels with per-image torchvision v2 augmentation objects (the earlier loader)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from pillsnap.data.augment import normalise

        image, label, index, _, _ = self.dataset[i]
        return normalise(self.transform(image.permute(2, 0, 1))[None])[0], label, index


def per_sample_v2(cfg):
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomRotation(cfg.rotate_degrees), v2.RandomAffine(0, translate=(cfg.translate,) * 2,
                                                                              scale=tuple(cfg.scale)),
                       v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)])


def tuple_collate(items):
    images, labels, indices = zip(*items)
    return torch.stack(images), torch.tensor(labels), torch.tensor(indices)


def one_pass(loader) -> Tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["targets"] if isinstance(batch, dict) else batch[1])
    return time.perf_counter() - start, seen


def detector_rates(tmp: Path, passes: int) -> Tuple[Dict[str, float], float]:
    """Detector training samples per second from PNGs and from the store, one process (the loader's work per
    worker), the same seeded samples on both sides; and the store's build time per 1,000 photos."""
    from pillsnap.config import load_config
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.manifest import assign_splits
    from pillsnap.train.data import SeededItems, detector_data
    from pillsnap.train.units.detector import detector_hyperparameters

    manifest = assign_splits(import_aihub(tmp / "aihub", show_progress=False).manifest, 0.15, 0)
    sides, build_s = {}, 0.0
    for name, cache in (("detector PNG", "false"), ("detector store", "true")):
        cfg = load_config(profile="ci", overrides=[
            f"paths.exp_dir={tmp / name.replace(' ', '-')}", "detection.image_size=640",
            "detection.include_single_images=true", f"data.stages.1.detector_images={len(manifest)}",
            f"dataloader.cache.enabled={cache}", f"dataloader.cache.dir={tmp / 'cache'}"])
        t0 = time.perf_counter()
        dataset = detector_data(cfg, manifest, 1, detector_hyperparameters(cfg), 10, show_progress=False).train.dataset
        build_s = time.perf_counter() - t0 if cache == "true" else build_s
        # ultralytics keeps the last batch x 8 photos it loaded in memory (128 at the shipped batch of 16): of
        # Stage 4's 60K photos a draw almost never finds one there, of this bench's hundred nearly always
        dataset.max_buffer_length = 2
        sides[name] = SeededItems(dataset)
    times: Dict[str, List[float]] = {name: [] for name in sides}
    n = len(sides["detector PNG"])
    for p in range(passes):
        for name, items in sides.items():
            t0 = time.perf_counter()
            for i in range(n):
                items[(i, 1000 * p + i)]
            times[name].append(time.perf_counter() - t0)
    return {name: n / statistics.median(t) for name, t in times.items()}, 1000 * build_s / n


def main() -> None:
    from pillsnap.config import AugmentConfig, DataloaderConfig
    from pillsnap.data.augment import BatchAugment
    from pillsnap.data.cache import PixelStore
    from pillsnap.data.row_format import RowFormat
    from pillsnap.data.datasets import (ClassificationDataset, ClassificationSamples, Collate, EpochSampler,
                                        make_loader)

    args = parse_args()
    torch.set_num_threads(args.threads)  # a shared machine: oversubscribed OpenMP threads distort the fast side
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-data-") as tmp:
        t0 = time.perf_counter()
        paths = synthetic_photos(Path(tmp) / "aihub", args.images)
        gen_s = time.perf_counter() - t0
        labels = [i % 20 for i in range(len(paths))]
        data = ClassificationSamples([(p, None) for p in paths], labels, [Path(p).stem for p in paths],
                                     [(0.5, 0.5, 0.25, 0.2)] * len(paths))
        t0 = time.perf_counter()
        store = PixelStore(Path(tmp) / "cache", args.size)
        rows = store.ensure(data.samples, show_progress=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jpeg_store = PixelStore(Path(tmp) / "cache", args.size, 0.0, RowFormat("jpeg", args.quality))
        jpeg_rows = jpeg_store.ensure(data.samples, show_progress=False)
        jpeg_build_s = time.perf_counter() - t0
        row_size = {"raw": store.bytes_on_disk() / len(store), "jpeg": jpeg_store.bytes_on_disk() / len(jpeg_store)}
        dl_cfg = DataloaderConfig(num_workers=args.workers, pin_memory=False, persistent_workers=False,
                                  prefetch_factor=2, drop_last=False)
        dataset = ClassificationDataset(data, args.size, store, rows)
        jpeg_dataset = ClassificationDataset(data, args.size, jpeg_store, jpeg_rows)
        augment = AugmentConfig()  # the shipped defaults
        loaders = {
            "naive": torch.utils.data.DataLoader(NaiveDataset(paths, labels, args.size), batch_size=args.batch,
                                                 num_workers=args.workers, collate_fn=tuple_collate),
            "warm cache": make_loader(dataset, args.batch, dl_cfg, False, collate=Collate(normalise_only=True)),
            "warm jpeg": make_loader(jpeg_dataset, args.batch, dl_cfg, False, collate=Collate(normalise_only=True)),
            "train augment": make_loader(dataset, args.batch, dl_cfg, True, EpochSampler(len(dataset), 0),
                                         collate=Collate(BatchAugment(augment, args.size, 20))),
            "uint8 batches": make_loader(dataset, args.batch, dl_cfg, True, EpochSampler(len(dataset), 0),
                                         collate=Collate()),
            "uint8 jpeg": make_loader(jpeg_dataset, args.batch, dl_cfg, True, EpochSampler(len(dataset), 0),
                                      collate=Collate()),
            "per-sample v2": torch.utils.data.DataLoader(CachedPerSample(dataset, per_sample_v2(augment)),
                                                         batch_size=args.batch, num_workers=args.workers,
                                                         collate_fn=tuple_collate),
        }
        one_pass(loaders["warm cache"])  # warm: the memory-mapped store is in the page cache, as from epoch 2 on
        times = {name: [] for name in loaders}
        for _ in range(args.passes):
            for name, loader in loaders.items():
                times[name].append(one_pass(loader)[0])
        detector, detector_build_s = detector_rates(Path(tmp), args.passes)
    rate = {name: len(paths) / statistics.median(t) for name, t in times.items()}
    rate.update(detector)
    print(f"{len(paths)} photos 976x1280 PNG -> {args.size}px, batch {args.batch}, {args.workers} workers, "
          f"{args.threads} torch thread(s), {args.passes} passes each (median); generating them took {gen_s:.1f}s")
    for name, r in rate.items():
        print(f"  {name:14s} {r:9.1f} images/s" + ("   (information)" if name in INFORMATION else ""))
    print(f"  pixel store build: {build_s:.2f}s for {len(paths)} images = {1000 * build_s / len(paths):.1f}s per "
          f"1,000 images raw, {1000 * jpeg_build_s / len(paths):.1f}s jpeg (process pool over all cores)")
    print(f"  bytes per row: raw {row_size['raw']:,.0f}, jpeg q{args.quality} {row_size['jpeg']:,.0f} "
          f"({row_size['raw'] / row_size['jpeg']:.1f}x smaller; synthetic photos are smoother than real ones)")
    print(f"  detector store build: {detector_build_s:.1f}s per 1,000 photos (with ultralytics' label scan)")
    for name in ("warm cache", "train augment", "warm jpeg"):
        ratio = rate[name] / rate["naive"]
        print(f"ratio {name}/naive = {ratio:.1f}x  target >= {TARGET:.0f}x: {'PASS' if ratio >= TARGET else 'FAIL'}")
    ratio = rate["detector store"] / rate["detector PNG"]
    print(f"ratio detector store/detector PNG = {ratio:.1f}x  target >= {TARGET:.0f}x: "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    ratio = rate["warm jpeg"] / rate["warm cache"]
    print(f"ratio warm jpeg/warm cache = {ratio:.2f}x  target >= {JPEG_TARGET}x: "
          f"{'PASS' if ratio >= JPEG_TARGET else 'FAIL'}")
    print(f"ratio train augment/per-sample v2 = {rate['train augment'] / rate['per-sample v2']:.1f}x (information)")
    if args.json:
        from pillsnap.core.jsonio import write_json_atomic

        write_json_atomic(args.json, {"images": len(paths), "size": args.size, "batch": args.batch,
                                      "workers": args.workers, "images_per_s": rate,
                                      "store_build_s_per_1000": 1000 * build_s / len(paths),
                                      "row_bytes": row_size})


if __name__ == "__main__":
    main()
