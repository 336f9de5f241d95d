"""The detector our engine trains vs the one ultralytics' own `model.train()` trains: same data, model, epochs.

A benchmark, not a test. Both sides start from the same generated YOLO11 yaml without pretrained weights, train on
the same stage dataset (the cpu-demo profile's synthetic photos: combination photos first, then single photos, up to
its detector cap) for the same epochs, batch and image size, each with its own recipe: ours is the detector unit in
the one training loop (AdamW, our LR schedule and warmup, gradient clip and EMA of train.detection, mosaic closing by
detection.close_mosaic_epochs); theirs is ultralytics' defaults. Both best checkpoints are then scored by the SAME
evaluator (pillsnap.infer.detection: the mAP protocol the stage gates read, which agrees with ultralytics' own
validator, tests/unit/evaluate/test_detection.py) on the same validation photos.

Target: ours reaches mAP@0.5 within MARGIN of ultralytics' (ours >= theirs - MARGIN).

    .venv/bin/python bench/detector_recipe.py [--epochs 6] [--classes 12] [--combinations 60]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
MARGIN = 0.05  # absolute mAP@0.5


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="detector epochs, both sides (cpu-demo: 6)")
    p.add_argument("--classes", type=int, default=12, help="synthetic classes (their single photos fill the cap)")
    p.add_argument("--combinations", type=int, default=60, help="combination folders of 4 photos")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def prepare(args: argparse.Namespace, work: Path):
    from pillsnap.config import load_config
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.class_map import build_class_map
    from pillsnap.data.manifest import assign_splits
    from pillsnap.data.synth import synthesize
    from pillsnap.environment import prepare_process

    cfg = load_config(profile="cpu-demo", overrides=[
        f"paths.exp_dir={work / 'exp'}", f"synth.out_dir={work / 'aihub'}", f"synth.num_classes={args.classes}",
        "synth.images_per_class=40", "synth.images_per_class_min=40", f"synth.combinations={args.combinations}",
        "synth.test_combinations=1", "synth.test_images_per_class=1", f"train.detection.epochs={args.epochs}",
        "train.classification.epochs=1", "train.strategy=sequential", f"train.seed={args.seed}",
        "logging.tensorboard=false", "logging.progress_bar=false", "dataloader.num_workers=0"])
    prepare_process(cfg.exp_dir)
    synthesize(cfg.synth, work / "aihub", show_progress=False)
    manifest = assign_splits(import_aihub(work / "aihub", show_progress=False).manifest, cfg.data.val_fraction,
                             cfg.data.seed)
    return cfg, manifest, build_class_map(manifest)


def train_ours(cfg, manifest, class_map, work: Path) -> Path:
    from pillsnap.train import train_stage

    results = train_stage(cfg, manifest, class_map, 1, work / "ours", show_progress=False)
    return Path(results["detector"].best_checkpoint)


def train_theirs(cfg, data, work: Path, seed: int) -> Path:
    from ultralytics import YOLO

    from pillsnap.models.detector import write_model_yaml

    yaml_path = write_model_yaml(cfg.detection, work / "theirs-model")
    model = YOLO(str(yaml_path))
    model.train(data=data.data_yaml, epochs=cfg.train.detection.epochs, imgsz=cfg.detection.image_size,
                batch=cfg.train.detection.batch_size, device="cpu", workers=0, amp=False, seed=seed,
                deterministic=True, plots=False, pretrained=False, project=str(work / "theirs"), name="run",
                exist_ok=True, verbose=False)
    return work / "theirs" / "run" / "weights" / "best.pt"


def score(model, cfg, val_rows) -> Dict[str, float]:
    from pillsnap.infer.detection import detection_samples, evaluate_detector, map_detector

    model = model.float().eval()
    return evaluate_detector(map_detector(model, cfg.detection.image_size), detection_samples(val_rows),
                             cfg.detection.conf_threshold)


def main() -> None:
    args = parse_args()
    import torch

    from pillsnap.data.yolo_dataset import stage_detector_dataset
    from pillsnap.models.detector import load_detector_checkpoint

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-det-") as tmp:
        work = Path(tmp)
        cfg, manifest, class_map = prepare(args, work)
        data, val_rows = stage_detector_dataset(cfg, manifest, 1)
        t0 = time.perf_counter()
        ours_ckpt = train_ours(cfg, manifest, class_map, work)
        t1 = time.perf_counter()
        theirs_ckpt = train_theirs(cfg, data, work, args.seed)
        t2 = time.perf_counter()
        from ultralytics import YOLO

        ours = score(load_detector_checkpoint(ours_ckpt), cfg, val_rows)
        theirs = score(YOLO(str(theirs_ckpt)).model, cfg, val_rows)
    print(f"YOLO11{cfg.detection.scale} at {cfg.detection.image_size} px, {args.epochs} epochs, batch "
          f"{cfg.train.detection.batch_size}, {data.images['train']} training / {len(val_rows)} validation photos "
          f"({data.composition}); scored by pillsnap.infer.detection on the same validation photos")
    for name, m, seconds in (("ours", ours, t1 - t0), ("ultralytics", theirs, t2 - t1)):
        print(f"  {name:12s} mAP@0.5 {m['mAP_0.5']:.4f}  mAP@0.5:0.95 {m['mAP_0.5_0.95']:.4f}  "
              f"P {m['precision']:.3f}  R {m['recall']:.3f}  ({seconds:.0f} s of training)")
    gap = ours["mAP_0.5"] - theirs["mAP_0.5"]
    ok = gap >= -MARGIN
    print(f"ours - ultralytics mAP@0.5 = {gap:+.4f}  target >= -{MARGIN}: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
