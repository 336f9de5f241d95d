"""Training throughput on 2 ranks vs 1 at the same per-rank batch, both started by torchrun, the same run.

A benchmark, not a test. Both sides train the classifier of a small synthetic stage through the one engine
(pillsnap.train.distributed: torchrun as a child, every rank its slice of each global batch, gradients all-reduced
once per step), one with --nproc_per_node=1 and one with 2, at the same per-rank batch, every rank with one thread
(OMP_NUM_THREADS=1 for both: torchrun sets it only for 2 or more ranks, and a 1-rank run with every core would
compare the same cores twice). The figure is the run's images per second over its epochs (samples / step time,
all ranks counted). On this 2-core CPU the ranks use gloo; on GPUs NCCL (the goal there: >= 1.8x on 2 GPUs).
The detector is off here: this measures how the training step scales, not the stage.

    .venv/bin/python bench/ddp_scaling.py [--batch 16] [--size 64] [--epochs 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TARGET = 1.8  # with 2 GPUs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="per-rank batch")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--backbone", default="resnet18")
    return p.parse_args()


def main() -> None:
    from pillsnap.config import load_config, to_dict
    from pillsnap.data.prepare import run_import, run_subset
    from pillsnap.data.synth import synthesize
    from pillsnap.environment import prepare_process
    from pillsnap.train.distributed.launch import run_training_processes
    from pillsnap.train.distributed.world import LaunchSpec

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-ddp-") as tmp:
        work = Path(tmp)
        cfg = load_config(profile="ci", overrides=[
            f"paths.exp_dir={work / 'exp'}", f"paths.data_root={work / 'aihub'}", f"synth.out_dir={work / 'aihub'}",
            "synth.num_classes=8", "synth.images_per_class=80", "data.stages.1.classes=8", "data.stages.1.images=640",
            f"classification.backbone={args.backbone}", f"classification.image_size={args.size}",
            f"train.classification.batch_size={args.batch}", f"train.classification.epochs={args.epochs}",
            "detection.enabled=false", "logging.tensorboard=false", "train.early_stopping.enabled=false"])
        prepare_process(cfg.exp_dir)
        synthesize(cfg.synth, work / "aihub", show_progress=False)
        run_import(cfg, show_progress=False)
        run_subset(cfg, 1)
        rates = {}
        os.environ["OMP_NUM_THREADS"] = "1"  # the ranks inherit it
        for nproc in (1, 2):
            spec = LaunchSpec(nproc, 1, 0, "127.0.0.1:29500", "gloo")
            result = run_training_processes(to_dict(cfg), 1, work / f"run{nproc}", None, None, spec)["classifier"]
            rates[nproc] = result["mean_throughput"]
            print(f"  {nproc} rank(s): {rates[nproc]:8.1f} images/s ({result['global_step']} steps, "
                  f"batch {args.batch} per rank)")
    ratio = rates[2] / rates[1]
    print(f"{args.backbone} at {args.size} px, per-rank batch {args.batch}, gloo on this CPU")
    print(f"ratio 2 ranks / 1 rank = {ratio:.2f}x  (GPU target >= {TARGET}x on 2 GPUs; on a 2-core CPU the ranks "
          "also share the cores with the data loading)")


if __name__ == "__main__":
    main()
