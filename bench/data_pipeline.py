"""Input pipeline throughput: decode-once cache + ClassificationDataset vs naive per-sample PNG decode, same run.

A benchmark, not a test. It writes ~200 synthetic single-pill photos at the real 976x1280 resolution
(pillsnap.data.synth) into a temp dir, then:
  naive  a plain torch Dataset that opens, decodes and resizes each PNG to SxS on every access;
  ours   pillsnap.data.cache.build_cache (timed: the one-off cost, per 1,000 images) + ClassificationDataset
         reading the warm memory-mapped cache.
Both yield normalised float tensors (the eval transform, so the comparison is the decode, not augmentation)
through the same DataLoader settings; passes alternate and the median pass counts. Our loader with the
training augmentations is printed too, for information.

    .venv/bin/python bench/data_pipeline.py [--images 200] [--size 384] [--workers 0] [--passes 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TARGET = 10.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=384, help="classifier input size (the cache stores SxS)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, the same for both sides")
    p.add_argument("--passes", type=int, default=2, help="timed passes per side (alternating)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in this process (DataLoader workers run with 1 as well)")
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

    def __init__(self, paths: List[str], labels: List[int], size: int):
        from pillsnap.data.datasets import eval_transform

        self.paths, self.labels, self.size, self.transform = paths, labels, size, eval_transform()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int, int]:
        with Image.open(self.paths[i]) as im:
            pixels = np.array(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.uint8)
        return self.transform(torch.from_numpy(pixels).permute(2, 0, 1).contiguous()), self.labels[i], i


def one_pass(loader) -> Tuple[float, int]:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[1])
    return time.perf_counter() - start, seen


def main() -> None:
    from pillsnap.config import DataloaderConfig
    from pillsnap.data.cache import build_cache
    from pillsnap.data.datasets import ClassificationDataset, ClassificationSamples, make_loader, safe_collate

    args = parse_args()
    torch.set_num_threads(args.threads)  # a shared machine: oversubscribed OpenMP threads distort the fast side
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-data-") as tmp:
        t0 = time.perf_counter()
        paths = synthetic_photos(Path(tmp) / "aihub", args.images)
        gen_s = time.perf_counter() - t0
        labels = [i % 20 for i in range(len(paths))]
        data = ClassificationSamples([(p, None) for p in paths], labels, [Path(p).stem for p in paths])
        t0 = time.perf_counter()
        cache = build_cache(data.samples, args.size, Path(tmp) / "cache", show_progress=False)
        build_s = time.perf_counter() - t0
        dl_cfg = DataloaderConfig(num_workers=args.workers, pin_memory=False, persistent_workers=False,
                                  prefetch_factor=2, drop_last=False)
        ours = make_loader(ClassificationDataset(data, args.size, False, cache), args.batch, dl_cfg, train=False)
        ours_aug = make_loader(ClassificationDataset(data, args.size, True, cache), args.batch, dl_cfg, train=False)
        naive = torch.utils.data.DataLoader(NaiveDataset(paths, labels, args.size), batch_size=args.batch,
                                            num_workers=args.workers, collate_fn=safe_collate)
        one_pass(ours)  # warm: the memory-mapped cache is in the page cache, as from the second epoch on
        times = {"naive": [], "ours": [], "ours+aug": []}
        for _ in range(args.passes):
            for name, loader in (("naive", naive), ("ours", ours), ("ours+aug", ours_aug)):
                times[name].append(one_pass(loader)[0])
    rate = {name: len(paths) / statistics.median(t) for name, t in times.items()}
    print(f"{len(paths)} photos 976x1280 PNG -> {args.size}px, batch {args.batch}, {args.workers} workers, "
          f"{args.threads} torch thread(s), {args.passes} passes each (median); generating them took {gen_s:.1f}s")
    print(f"  naive decode+resize   {rate['naive']:9.1f} images/s")
    print(f"  ours (warm cache)     {rate['ours']:9.1f} images/s")
    print(f"  ours + train augment  {rate['ours+aug']:9.1f} images/s   (information)")
    print(f"  cache build: {build_s:.2f}s for {len(paths)} images = {1000 * build_s / len(paths):.1f}s per 1,000 "
          f"images (process pool over all cores)")
    ratio = rate["ours"] / rate["naive"]
    print(f"ratio ours/naive = {ratio:.1f}x  target >= {TARGET:.0f}x: {'PASS' if ratio >= TARGET else 'FAIL'}")


if __name__ == "__main__":
    main()
