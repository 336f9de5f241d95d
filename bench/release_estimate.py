"""The release at its real size, estimated from rates measured here: disk, RAM and wall time of every step from the
import to the Stage 4 verdict, for the shipped config, on 1 and on N GPUs.

An estimate, not a test. Measured in this run, on one core each, from synthetic photos at the release's size
(976×1280 PNG): a label file parsed (import), a photo's fused data-preparation pass (read, sha1, full decode, the
classifier's row resized and stored: `pillsnap.data.shards.inspect_photo`; and what fitting a combination photo
into the detector store adds to it), a raw row read and a JPEG row decoded
from the pixel store, a validation photo letterboxed to the detector's size from its PNG (before) and from its
detector store row (now), the NMS of one photo's head output at the mAP protocol's conf 0.001 (torchvision's, on a CPU
core: an upper bound for the GPU, where validation runs it), and a detector
training sample (ultralytics' recipe at 640 px: a mosaic of 4 photos, HSV, flips, affine) made from the PNGs
(before the detector store) and from the decode-once detector store (now), by `bench/data_pipeline.py`'s
detector_rates. GPU step rates are a stated table (`--gpu-table`), or measured ones when you pass them
(`make gpu-check` prints them).

Each training step runs at the slower of the GPU and its loader (`--workers` loader processes per GPU); the
interleaved strategy shares one GPU, so the two models' times add. Epochs are the configured ones (early stopping
may end sooner: the estimate is the budget). Validation runs every epoch on every rank's slice.

    .venv/bin/python bench/release_estimate.py [--photos 60] [--cores 16] [--gpus 8] [--workers 8] [--json out]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RELEASE = {"train_photos": 2_468_000, "classes": 4523, "combination_share": 0.007}
# Stated GPU rates (images/s on one H100, bf16, channels_last, compiled), to be replaced by measured ones: timm's
# EfficientNetV2-S at 384 px trains at ~900-1,100 img/s on an A100/H100 class GPU; a YOLO11m at 640 px trains at
# 400-600 img/s (ultralytics' figures); inference is ~3x training.
GPU_TABLE = {"classifier_train": 1000.0, "classifier_infer": 3000.0, "detector_train": 500.0,
             "detector_infer": 1500.0}
# A trained detector leaves a few hundred of its 8,400 anchors above the mAP protocol's conf 0.001 on a pill photo
# (an untrained one most of them: torchvision's NMS on a CPU core then takes ~120 ms a photo, not ~4)
NMS_CANDIDATES = 1000
DDP_EFFICIENCY = 0.9  # per added GPU: the gradient all-reduce does not overlap the backward pass here
OTHER_STEPS_S = 15 * 60  # per stage: evaluation, export + parity, API check, report (a stated allowance)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=60, help="synthetic photos to measure on")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="CPU cores per GPU (an N-GPU column has N times as many: loaders and data preparation)")
    p.add_argument("--gpus", type=int, default=8, help="N for the N-GPU column")
    p.add_argument("--workers", type=int, default=8, help="loader processes per GPU (dataloader.num_workers)")
    p.add_argument("--gpu-table", type=json.loads, default={},
                   help='measured GPU rates replacing the stated ones, e.g. \'{"classifier_train": 850}\'')
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args()


def per_item(fn: Callable[[int], object], n: int) -> float:
    """Median seconds of fn(i) over n items (after one warm-up call)."""
    fn(0)
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(photos: int) -> Dict[str, float]:
    import cv2
    from PIL import Image

    from pillsnap.config import SynthConfig
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.cache import sample_pixels
    from pillsnap.data.row_format import RowFormat
    from pillsnap.data.shards import ShardSettings, inspect_photo, manifest_photos
    from pillsnap.data.synth import synthesize
    import torch

    from pillsnap.data.detector_store import fit_long_side, fitted_shape
    from pillsnap.infer.detection import MAP_CONF, MAP_IOU, MAP_MAX_DET, FittedPhoto, letterbox, nms_batch
    from bench.data_pipeline import detector_rates

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="pillsnap-estimate-") as tmp:
        root = Path(tmp) / "aihub"
        synthesize(SynthConfig(num_classes=4, images_per_class=max(2, photos // 4), test_images_per_class=0,
                               combinations=0, test_combinations=0, width=976, height=1280, workers=0),
                   root, show_progress=False)
        start = time.perf_counter()
        manifest = import_aihub(root, show_progress=False).manifest
        import_s = (time.perf_counter() - start) / len(manifest)
        listed = manifest_photos(manifest, include_crops=False)
        n = min(photos, len(listed))
        jpeg = RowFormat("jpeg", 90)
        settings = ShardSettings(True, True, str(Path(tmp) / "cache"), 384, 0.15, False)  # its rows: + encode
        fitting = ShardSettings(True, True, str(Path(tmp) / "cache"), 384, 0.15, False, detector_size=640)
        rows = [sample_pixels(Image.open(p.path).convert("RGB"), None, 384) for p in listed[:n]]
        encoded = [jpeg.encode(r) for r in rows]
        raw = np.lib.format.open_memmap(Path(tmp) / "rows.npy", "w+", np.uint8, (n, 384, 384, 3))
        raw[:] = np.stack(rows)
        detector, _ = detector_rates(Path(tmp), passes=1)
        fitted = np.lib.format.open_memmap(Path(tmp) / "det.npy", "w+", np.uint8, (n, 640, 640, 3))
        fitted[:] = np.stack([fit_long_side(p.path, None, 640) for p in listed[:n]])
        shape = (listed[0].height, listed[0].width)
        h, w = fitted_shape(*shape, 640)
        # YOLO's 8,400 anchors at 640 px, NMS_CANDIDATES of them above conf 0.001
        head = torch.rand(1, 5, 8400)
        head[:, :2] *= 640
        head[:, 2:4] = head[:, 2:4] * 60 + 10
        head[:, 4] = 0.0
        head[0, 4, torch.randperm(8400)[:NMS_CANDIDATES]] = torch.rand(NMS_CANDIDATES) ** 3 * 0.999 + 0.001
        out = {
            "import_s": import_s,
            "fused_prep_raw_s": per_item(lambda i: inspect_photo(listed[i % n], settings), n),
            "jpeg_encode_s": per_item(lambda i: jpeg.encode(rows[i % n]), n),
            "raw_row_read_s": per_item(lambda i: np.array(raw[i % n]), n),
            "jpeg_row_decode_s": per_item(lambda i: jpeg.decode(encoded[i % n], 384), n),
            "png_letterbox_s": per_item(lambda i: letterbox(cv2.imread(listed[i % n].path), 640), n),
            "store_letterbox_s": per_item(lambda i: letterbox(FittedPhoto(np.array(fitted[i % n, :h, :w]), shape),
                                                              640), n),
            "nms_s": per_item(lambda i: nms_batch(head, MAP_CONF, MAP_IOU, MAP_MAX_DET), n),
            "detector_fit_s": per_item(lambda i: inspect_photo(listed[i % n]._replace(combination=True), fitting), n)
            - per_item(lambda i: inspect_photo(listed[i % n], fitting), n),
            "detector_sample_png_s": 1 / detector["detector PNG"],
            "detector_sample_store_s": 1 / detector["detector store"],
            "jpeg_row_bytes": float(np.mean([len(e) for e in encoded])),
        }
    out["fused_prep_jpeg_s"] = out["fused_prep_raw_s"] + out["jpeg_encode_s"]
    return out


def stage_sizes(cfg, stage: int) -> Dict[str, float]:
    s = cfg.stage(stage)
    share = cfg.data.val_fraction / (1 - cfg.data.val_fraction)
    return {"train": s.images, "val": max(s.min_eval_samples, s.images * share),
            "det_train": s.detector_images, "det_val": s.detector_images * share}


def training_s(cfg, stage: int, rates: Dict[str, float], gpus: int, workers: int, gpu: Dict[str, float],
               detector_sample_s: float, det_val_photo_s: float, nms_s: float = 0.0) -> Dict[str, float]:
    """One stage's training wall time: each model's epochs at min(GPU, loader), plus validation every epoch.
    `workers`: the loader processes that get a core of their own, over all GPUs."""
    size, t = stage_sizes(cfg, stage), cfg.train
    scale = gpus * (DDP_EFFICIENCY if gpus > 1 else 1.0)
    loader_cls = workers / rates["classifier_row_s"]
    loader_det = workers / detector_sample_s
    cls = t.classification.epochs * (size["train"] / min(gpu["classifier_train"] * scale, loader_cls)
                                     + size["val"] / min(gpu["classifier_infer"] * gpus, loader_cls))
    # 4 reader threads per rank; the NMS runs in the rank's own thread
    det_val_rate = min(gpu["detector_infer"] * gpus, gpus * 4 / det_val_photo_s, gpus / nms_s if nms_s else np.inf)
    det = t.detection.epochs * (size["det_train"] / min(gpu["detector_train"] * scale, loader_det)
                                + size["det_val"] / det_val_rate)
    return {"classifier_s": cls, "detector_s": det,
            "classifier_loader_bound": gpu["classifier_train"] * scale > loader_cls,
            "detector_loader_bound": gpu["detector_train"] * scale > loader_det}


def main() -> None:
    from pillsnap.config import load_config

    args = parse_args()
    cfg = load_config(None)  # the shipped configs/pillsnap.yaml
    m = measure(args.photos)
    gpu = {**GPU_TABLE, **args.gpu_table}
    photos = RELEASE["train_photos"]
    raw_tb, jpeg_tb = photos * 384 * 384 * 3 / 1e12, photos * 384 * 384 * 3 / 10 / 1e12
    print(f"measured on this machine, one core each ({args.photos} synthetic 976x1280 PNG photos):")
    for key, value in m.items():
        print(f"  {key:20s} {value * 1e3:9.2f} ms" if key.endswith("_s") else f"  {key:20s} {value:9.0f}")
    print(f"GPU rates (img/s on one GPU): {gpu}{'  (stated table)' if not args.gpu_table else ''}")
    print(f"\nrelease: {photos:,} training photos, {RELEASE['classes']:,} classes; {args.cores} cores and up to "
          f"{args.workers} loader workers per GPU")
    print(f"pixel store: raw {raw_tb:.2f} TB; jpeg ~{jpeg_tb:.2f} TB at 10x (synthetic rows measure "
          f"{m['jpeg_row_bytes'] / 1e3:.1f} KB = {384 * 384 * 3 / m['jpeg_row_bytes']:.0f}x; real photos are noisier)")
    det_store_gb = cfg.stage(4).detector_images * 640 * 640 * 3 / 1e9
    print(f"detector store: Stage 4's {cfg.stage(4).detector_images:,} photos x 640x640x3 = {det_store_gb:.0f} GB "
          "uint8 (raw rows)")
    steps: Dict[str, Dict[str, float]] = {}
    # before: PNGs for the detector's training and validation (its NumPy NMS not counted: it is gone);
    # now: the detector store for both, and torch's NMS at its CPU rate
    variants = {
        "before (the detector from PNGs)": {"classifier_row_s": m["jpeg_row_decode_s"],
                                            "detector_sample_s": m["detector_sample_png_s"],
                                            "det_val_photo_s": m["png_letterbox_s"], "nms_s": 0.0},
        "now (the detector store)": {"classifier_row_s": m["jpeg_row_decode_s"],
                                     "detector_sample_s": m["detector_sample_store_s"],
                                     "det_val_photo_s": m["store_letterbox_s"], "nms_s": m["nms_s"]},
    }
    for name, v in variants.items():
        for gpus in (1, args.gpus):
            cores = args.cores * gpus
            prep = {"import": photos * m["import_s"] / cores,
                    "validate + store fill (jpeg)": photos * m["fused_prep_jpeg_s"] / cores,
                    "  + combination photos into the detector store":
                        photos * RELEASE["combination_share"] * m["detector_fit_s"] / cores}
            total, lines = sum(prep.values()), []
            workers = min(gpus * args.workers, cores)
            for stage in (1, 2, 3, 4):
                t = training_s(cfg, stage, v, gpus, workers, gpu, v["detector_sample_s"], v["det_val_photo_s"],
                               v["nms_s"])
                stage_s = t["classifier_s"] + t["detector_s"] + OTHER_STEPS_S
                total += stage_s
                bound = [k.split("_")[0] for k in ("classifier_loader_bound", "detector_loader_bound") if t[k]]
                lines.append(f"    stage {stage}: {stage_s / 3600:6.1f} h (classifier {t['classifier_s'] / 3600:.1f} h, "
                             f"detector {t['detector_s'] / 3600:.1f} h{'; loader-bound: ' + ', '.join(bound) if bound else ''})")
            steps[f"{name}, {gpus} GPU"] = {"total_h": total / 3600}
            print(f"\n{name}, {gpus} GPU(s), {cores} cores, {workers} loader workers: import -> Stage 4 verdict = "
                  f"{total / 3600:.1f} h")
            for step, seconds in prep.items():
                print(f"    {step}: {seconds / 3600:6.1f} h")
            print("\n".join(lines))
    if args.json:
        from pillsnap.core.jsonio import write_json_atomic
        write_json_atomic(args.json, {"measured": m, "gpu": gpu, "estimates": steps, "cores": args.cores})


if __name__ == "__main__":
    main()
