"""Data preparation: the fused validate + cache pass vs the two passes it replaces, and shards on 2 Dask workers
vs 1, measured in the same run on the same photos.

A benchmark, not a test. Synthetic photos at the real size (976×1280 PNG, like the AIHub release). Every figure is
photos per second:
- two passes: validation alone (read, hash, decode, check: what validation did before) and then the pixel cache
  alone (PixelStore.ensure: decode, resize), each in this process, one after the other;
- fused: one shard pass doing both from one decode (pillsnap.data.shards.run_shard), in this process;
- both stores: the fused pass also fitting every photo into the detector's store at 640 px (as it does for the
  release's combination photos): what the extra store costs per detector photo;
- Dask: the same fused shards mapped on a local dask.distributed cluster of 1 worker process, then of 2 (one thread
  each; timed after the cluster is up, as a standing cluster would be).
Goal: fused >= 1.8x the two passes (one decode instead of two); 2 workers ~2x 1 where the machine has the cores.

    .venv/bin/python bench/prep_scaling.py [--photos 240] [--size 384] [--shard 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
FUSED_TARGET = 1.8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=240, help="single-pill photos (split over 8 classes)")
    p.add_argument("--size", type=int, default=384, help="the pixel cache's size (the classifier's input)")
    p.add_argument("--shard", type=int, default=30, help="photos per shard")
    p.add_argument("--detector-size", type=int, default=640, help="the detector store's size")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    from dask.distributed import Client, LocalCluster

    from pillsnap.config import load_config
    from pillsnap.data.cache import PixelStore, photo_samples
    from pillsnap.data.manifest import read_manifest
    from pillsnap.data.prepare import manifest_path, run_import
    from pillsnap.data.shards import ShardSettings, manifest_photos, plan_shards, run_shard, shard_photos
    from pillsnap.data.synth import synthesize

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-prep-") as tmp:
        work = Path(tmp)
        cfg = load_config(profile="ci", overrides=[
            f"paths.exp_dir={work / 'exp'}", f"paths.data_root={work / 'aihub'}", f"synth.out_dir={work / 'aihub'}",
            "synth.num_classes=8", f"synth.images_per_class={max(1, args.photos // 8)}", "synth.combinations=0",
            "synth.test_combinations=0", "synth.width=976", "synth.height=1280", f"synth.workers={os.cpu_count()}"])
        synthesize(cfg.synth, work / "aihub", show_progress=False)
        run_import(cfg, show_progress=False)
        manifest = read_manifest(manifest_path(cfg))
        n = len(manifest)
        samples = [s for p, k, b in zip(manifest.image_path, manifest.kind, manifest.boxes)
                   for s in photo_samples(p, k, b, False)]
        v = cfg.data.validation

        def settings(cache: Path | None) -> ShardSettings:
            return ShardSettings(v.check_images, v.hash_duplicates, str(cache) if cache else None, args.size, 0.0,
                                 False)

        def in_process(cache: Path | None, results: str):
            shards = plan_shards(manifest, settings(cache), args.shard)
            return [run_shard(s, settings(cache), work / results, workers=1) for s in shards]

        t_validate, _ = _timed(lambda: in_process(None, "validate-only"))
        t_cache, _ = _timed(lambda: PixelStore(work / "cache-two-pass", args.size).ensure(samples, workers=1,
                                                                                          show_progress=False))
        t_fused, _ = _timed(lambda: in_process(work / "cache-fused", "fused"))
        both = ShardSettings(v.check_images, v.hash_duplicates, str(work / "cache-both"), args.size, 0.0, False,
                             detector_size=args.detector_size)
        as_detector_photos = [p._replace(combination=True) for p in manifest_photos(manifest, False)]
        t_both, _ = _timed(lambda: [run_shard(s, both, work / "both", workers=1)
                                    for s in shard_photos(as_detector_photos, both, args.shard)])
        rates = {"two_passes": n / (t_validate + t_cache), "fused": n / t_fused, "both_stores": n / t_both}

        for workers in (1, 2):
            fused = settings(work / f"cache-dask{workers}")
            shards = plan_shards(manifest, fused, args.shard)
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                    Client(cl) as client:
                client.run(lambda: __import__("pillsnap.data.shards"))  # imports out of the timing
                one = partial(run_shard, settings=fused, results_dir=work / f"dask{workers}", workers=1)
                t, _ = _timed(lambda: client.gather(client.map(one, shards, pure=False)))
            rates[f"dask_{workers}"] = n / t

    fused_ratio = rates["fused"] / rates["two_passes"]
    dask_ratio = rates["dask_2"] / rates["dask_1"]
    print(f"{n} photos 976x1280 PNG, cache {args.size}px, shards of {args.shard}, {os.cpu_count()} CPU cores")
    print(f"  two passes (validate {t_validate:.1f} s + cache {t_cache:.1f} s): {rates['two_passes']:.1f} photos/s")
    print(f"  fused pass ({t_fused:.1f} s): {rates['fused']:.1f} photos/s  -> {fused_ratio:.2f}x the two passes "
          f"(goal >= {FUSED_TARGET}x: {'PASS' if fused_ratio >= FUSED_TARGET else 'FAIL'})")
    print(f"  fused, both stores ({t_both:.1f} s): {rates['both_stores']:.1f} photos/s  -> "
          f"{rates['both_stores'] / rates['fused']:.2f}x the fused pass: +{(t_both - t_fused) / n * 1000:.1f} ms per "
          f"photo also fitted to {args.detector_size} px for the detector")
    print(f"  Dask, 1 worker: {rates['dask_1']:.1f} photos/s; 2 workers: {rates['dask_2']:.1f} photos/s  -> "
          f"{dask_ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"photos": n, "size": args.size, "rates": rates, "fused_ratio": fused_ratio,
                                         "dask_ratio": dask_ratio}, indent=1))


if __name__ == "__main__":  # dask's worker processes re-import this file
    main()
