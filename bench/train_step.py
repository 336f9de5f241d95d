"""Training-step throughput: one optimizer step of the classifier unit under its OOM guard vs a plain
hand-written timm loop, same run.

A benchmark, not a test. Both sides train the same timm model (same init), batch, dtype and math: AdamW,
cross-entropy with label smoothing, grad-norm clipping, a per-step LambdaLR. Our side adds what the engine's
step path does on top: OOM recovery around the step (replay point of BatchNorm buffers + RNG), micro-batch
planning, one loss sync per step with the non-finite check, the sample-based schedule, the compile guard. Data is already in
memory (host tensors, copied to the device inside the step, as a loader batch would be). Timed blocks
alternate between the two sides so a busy machine slows both alike; the median block counts.

CPU default: resnet18 at 96 px, batch 32, 1 thread. With CUDA: tf_efficientnetv2_s at 384 px, bf16 autocast,
channels_last (--compile reduce-overhead|max-autotune optional), plus a model-only ceiling: the plain loop on
tensors that already sit on the GPU.

    .venv/bin/python bench/train_step.py [--model resnet18] [--size 96] [--batch 32] [--blocks 6] [--steps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
TARGET = 0.95
CEILING_TARGET = 0.90  # with CUDA: the engine's step against the same model's forward+backward on resident tensors


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnetv2_s" if cuda else "resnet18")
    p.add_argument("--size", type=int, default=384 if cuda else 96)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--blocks", type=int, default=6, help="timed blocks per side (alternating)")
    p.add_argument("--steps", type=int, default=10 if cuda else 4, help="optimizer steps per block")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--compile", default="none", choices=["none", "reduce-overhead", "max-autotune"])
    p.add_argument("--json", type=Path, help="also write the rates and ratios to this file (make gpu-check reads it)")
    return p.parse_args()


def build_member(args: argparse.Namespace, work: Path):
    """The classifier unit (with its OOM guard) over a tiny synthetic stage; its model is the one benchmarked."""
    from pillsnap.config import load_config
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.class_map import build_class_map
    from pillsnap.data.manifest import assign_splits
    from pillsnap.data.synth import synthesize
    from pillsnap.train.loops.members import classifier_member, run_policy
    from pillsnap.train.services.oom_state_machine import FaultInjector

    cuda = torch.cuda.is_available()
    cfg = load_config(profile="ci", overrides=[
        f"paths.exp_dir={work / 'exp'}", f"synth.out_dir={work / 'aihub'}", f"paths.data_root={work / 'aihub'}",
        f"classification.backbone={args.model}", f"classification.image_size={args.size}",
        f"train.classification.batch_size={args.batch}", "logging.tensorboard=false", "train.grad_clip=1.0",
        f"optimization.amp={cuda}", "optimization.amp_dtype=bf16", f"optimization.channels_last={cuda}",
        f"optimization.torch_compile={args.compile}", "dataloader.cache.enabled=false"])
    synthesize(cfg.synth, work / "aihub", show_progress=False)
    manifest = assign_splits(import_aihub(work / "aihub", show_progress=False).manifest, 0.2, 0)
    member = classifier_member(cfg, manifest, build_class_map(manifest), work / "run", run_policy(cfg),
                               show_progress=False, injectors={"classifier": FaultInjector()})
    member.unit.plan_schedule(10_000)
    return member


def plain_loop(unit, data_on_device: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The hand-written loop: same model architecture and init, same optimizer, loss, clip and schedule."""
    import copy

    from pillsnap.train.services.policy import CompiledModel
    from pillsnap.train.services.schedule import lr_schedule

    cfg, policy = unit.cfg, unit.policy
    model = copy.deepcopy(unit.model)
    train_model = CompiledModel(model, policy.compile_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.classification.lr, weight_decay=cfg.train.weight_decay,
                            fused=policy.device.type == "cuda")
    sched = lr_schedule(opt, 10_000, cfg.train.warmup_steps, "cosine", args_batch(unit))
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
    dev, dtype = policy.device, policy.amp_dtype
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if not data_on_device:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if policy.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = crit(train_model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return step


def args_batch(unit) -> int:
    return unit.batch_size * unit.accum


def timed_block(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from pillsnap.core.jsonio import write_json_atomic

    args = parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-step-") as tmp:
        member = build_member(args, Path(tmp))
        unit = member.unit
        dev = unit.policy.device
        n_classes = len(unit.labels)
        x = torch.randn(args.batch, 3, args.size, args.size)
        y = torch.randint(0, n_classes, (args.batch,))
        if cuda:
            x, y = x.pin_memory(), y.pin_memory()
        batch = {"images": x, "targets": y, "indices": torch.arange(args.batch),
                 "seeds": torch.arange(args.batch), "boxes": torch.zeros(args.batch, 4)}  # already normalised
        sides: Dict[str, Callable[[], None]] = {"ours": lambda: member.guard.step([batch], unit.updates + 1, 1,
                                                                                      lambda: Path("unused"))}
        plain = plain_loop(unit, data_on_device=False)
        sides["plain"] = lambda: plain(x, y)
        if cuda:
            ceiling = plain_loop(unit, data_on_device=True)
            xd = x.to(dev).contiguous(memory_format=torch.channels_last)
            yd = y.to(dev)
            sides["ceiling"] = lambda: ceiling(xd, yd)
        for name, step in sides.items():
            timed_block(step, args.warmup, dev)
        times: Dict[str, List[float]] = {name: [] for name in sides}
        for _ in range(args.blocks):
            for name, step in sides.items():
                times[name].append(timed_block(step, args.steps, dev))
    rate = {name: args.batch * args.steps / statistics.median(t) for name, t in times.items()}
    print(f"model={args.model} size={args.size} batch={args.batch} device={dev} amp={unit.policy.amp_dtype} "
          f"channels_last={unit.policy.channels_last} compile={unit.train_model.state} "
          f"threads={torch.get_num_threads()} blocks={args.blocks}x{args.steps} steps (median block)")
    for name, r in rate.items():
        print(f"  {name:8s} {r:9.1f} images/s")
    ratio = rate["ours"] / rate["plain"]
    print(f"ratio ours/plain = {ratio:.3f}  target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'}")
    ceiling = rate["ours"] / rate["ceiling"] if "ceiling" in rate else None
    if ceiling is not None:
        print(f"ratio ours/model-only ceiling = {ceiling:.3f}  target >= {CEILING_TARGET}: "
              f"{'PASS' if ceiling >= CEILING_TARGET else 'FAIL'}")
    if args.json:
        write_json_atomic(args.json, {
            "model": args.model, "size": args.size, "batch": args.batch, "device": str(dev),
            "amp": str(unit.policy.amp_dtype), "compile": unit.train_model.state, "images_per_s": rate,
            "ratio_plain": ratio, "target_plain": TARGET, "ratio_ceiling": ceiling, "target_ceiling": CEILING_TARGET})


if __name__ == "__main__":
    main()
