"""`make gpu-check`: the acceptance run of what every user of configs/pillsnap.yaml runs on a CUDA GPU.

One table on the terminal, one JSON file (--out). Each row is measured in this run:

  environment    python, torch, CUDA, the GPU and its memory, the pinned libraries actually imported
  photos         full-size (976x1280) synthetic photos in the AIHub layout, imported as the stage's data
  gpu tests      `pytest tests/gpu`: probes, device augmentation, bf16 training of both strategies
  auto batch     both models at the shipped sizes, probed with real training steps: the batch found and its peak
                 memory against train.auto_batch_vram_headroom (D-4)
  stage 1        the shipped config (interleaved; EfficientNetV2-S 384 px + YOLO11m 640 px; bf16 autocast,
                 channels_last, torch.compile reduce-overhead) at the probed batches, a bounded number of steps per
                 epoch: both models compiled, every step finite, img/s per model
  nvml in D-10   the D-10 training lines of that run show the device's NVML memory
  real OOM       GPU memory reserved until the classifier's step no longer fits: a real CUDA OOM, decided by the D-8
                 state machine (S1 fp16, then S2 micro-batches), after which training goes on
  augmentation   GPU vs CPU batch augmentation of the same photos and (index, seed): the same geometry, colours
                 within a tolerance
  train step     bench/train_step.py: the engine's step img/s against the model-only ceiling (goal >= 0.90)
  data pipeline  bench/data_pipeline.py: the training loader's img/s against what the training step consumes
                 (goal >= 1.5x)

Pretrained weights are off (the machine may be offline, and the check measures the path, not accuracy).
Exit code: 0 every row passed; 1 a row failed or broke; 3 no CUDA: the GPU rows say "no CUDA" and nothing was
accepted. `--cpu-smoke` runs every row's code at tiny sizes on a CPU to check the script itself (rows marked
"smoke"; still exit 3, since a CPU accepts nothing).

    python bench/gpu_check.py [--out gpu-check.json] [--steps 20] [--cpu-smoke]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NO_CUDA_EXIT = 3
STEP_CEILING_GOAL, LOADER_GOAL = 0.90, 1.5
AUGMENT_MEAN, AUGMENT_P99 = 0.02, 0.1  # interpolation rounding between OpenCV (CPU) and grid_sample (GPU)


@dataclass
class Row:
    name: str
    goal: str
    status: str = "not run"  # pass | fail | error | no CUDA; "smoke pass" / "smoke fail" on a CPU
    measured: Dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


class Check:
    """The run's shared state: arguments, work folder, the synthetic stage, plans and captured training lines."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.cuda = torch.cuda.is_available()
        self.smoke = args.cpu_smoke and not self.cuda
        self.stage: Optional[tuple] = None  # (config, subset, class map)
        self.plans: Dict[str, Dict[str, Any]] = {}
        self.lines: List[str] = []
        self.bench: Dict[str, Dict[str, Any]] = {}

    @property
    def runs(self) -> bool:
        """GPU rows run: on CUDA, or at tiny sizes in a CPU smoke run."""
        return self.cuda or self.smoke

    def config(self, *extra: str):
        """configs/pillsnap.yaml as shipped; sizes shrink only in a CPU smoke run."""
        from pillsnap.config import load_config

        w, a = self.work, self.args
        sizes = [f"paths.exp_dir={w / 'exp'}", f"paths.data_root={w / 'aihub'}", f"synth.out_dir={w / 'aihub'}",
                 f"synth.num_classes={a.classes}", f"synth.images_per_class={a.photos_per_class}",
                 "synth.test_images_per_class=1", f"synth.combinations={a.combinations}", "synth.test_combinations=1",
                 "synth.images_per_combination=4", "classification.pretrained=false", "detection.pretrained=false",
                 "train.classification.epochs=2", "train.detection.epochs=2", f"train.max_steps_per_epoch={a.steps}",
                 "train.step_log_interval=5", "logging.progress_bar=false"]
        if self.smoke:
            sizes += ["synth.width=244", "synth.height=320", "classification.backbone=test_efficientnet",
                      "classification.image_size=64", "detection.scale=n", "detection.image_size=64",
                      "train.classification.batch_size=8", "train.classification.auto_batch_max=8",
                      "train.detection.batch_size=4", "train.detection.auto_batch_max=4",
                      "optimization.compile_backend=aot_eager", "dataloader.num_workers=0", "train.warmup_steps=2"]
        return load_config(overrides=[*sizes, *extra])


# ---------------------------------------------------------------------------------------------------------- rows
def row_environment(c: Check, row: Row) -> None:
    import timm
    import ultralytics

    m = row.measured
    m.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             timm=timm.__version__, ultralytics=ultralytics.__version__)
    if not c.cuda:
        row.status, row.note = "no CUDA", "torch sees no CUDA device"
        return
    props = torch.cuda.get_device_properties(0)
    m.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
             bf16=torch.cuda.is_bf16_supported())
    row.status = "pass" if m["bf16"] else "fail"
    row.note = "" if m["bf16"] else "no bf16: the shipped amp_dtype=auto falls back to fp16 with a GradScaler"


def row_photos(c: Check, row: Row) -> None:
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.class_map import build_class_map
    from pillsnap.data.manifest import assign_splits
    from pillsnap.data.synth import synthesize

    cfg = c.config()
    counts = synthesize(cfg.synth, c.work / "aihub", show_progress=False)
    manifest = assign_splits(import_aihub(c.work / "aihub", show_progress=False).manifest, cfg.data.val_fraction,
                             cfg.data.seed)
    c.stage = (cfg, manifest, build_class_map(manifest))
    row.measured.update(size=f"{cfg.synth.width}x{cfg.synth.height}", classes=cfg.synth.num_classes,
                        photos=int(len(manifest)), combination_photos=int((manifest["kind"] != "single").sum()),
                        written=counts)
    row.status = "pass" if len(manifest) else "fail"


def row_gpu_tests(c: Check, row: Row) -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    row.measured.update(counts, summary=summary)
    row.status = "pass" if done.returncode == 0 and counts.get("passed") and not counts.get("skipped") else "fail"
    if row.status == "fail":
        row.note = done.stdout[-1500:]


def row_auto_batch(c: Check, row: Row) -> None:
    from pillsnap.train import tune_batch

    cfg, subset, cmap = c.stage
    headroom, ok = cfg.train.auto_batch_vram_headroom, True
    for model in ("classifier", "detector"):
        plan = tune_batch(cfg, subset, cmap, model, 1)
        c.plans[model] = {"batch": plan}
        fraction = plan.get("memory_fraction")
        row.measured[model] = {k: plan.get(k) for k in ("batch_size", "grad_accum", "eval_batch_size", "device",
                                                           "probed")}
        row.measured[model]["memory_fraction"] = round(fraction, 3) if fraction is not None else None
        ok &= bool(plan["probed"]) and fraction is not None and fraction <= headroom and plan["batch_size"] >= 2
    row.status = "pass" if ok else "fail"


class _Lines(logging.Handler):
    def __init__(self, sink: List[str]):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def row_stage(c: Check, row: Row) -> None:
    from pillsnap.train import train_stage

    cfg, subset, cmap = c.stage
    handler = _Lines(c.lines)
    lib = logging.getLogger("pillsnap")
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    try:
        results = train_stage(cfg, subset, cmap, 1, c.work / "stage_1", plans=c.plans, show_progress=False)
    finally:
        lib.removeHandler(handler)
    ok = True
    for name, r in results.items():
        losses = [h["train_loss"] for h in r.history]
        row.measured[name] = {"policy": r.policy, "compile": r.compile, "steps": r.global_step,
                              "epochs": r.epochs_completed, "batch": f"{r.batch_size}x{r.grad_accum}",
                              "img_s": round(r.mean_throughput, 1), r.monitor: r.best_metric}
        ok &= (r.compile == "compiled" and "amp=bfloat16" in r.policy and "channels_last=True" in r.policy
               and r.epochs_completed == r.epochs_planned and all(math.isfinite(x) for x in losses))
    row.status = "pass" if ok else "fail"


def row_nvml(c: Check, row: Row) -> None:
    found = {}
    for line in c.lines:
        hit = re.match(r"(\[train(?:/det)?\]) .* nvml=(\d+)MB", line)
        if hit:
            found[hit.group(1)] = int(hit.group(2))
    row.measured.update(found)
    row.status = "pass" if set(found) == {"[train]", "[train/det]"} and min(found.values()) > 0 else "fail"


class _SmokeOom:
    """A CPU has no device memory to reserve: the smoke run raises the OOM the reservation would."""

    def __init__(self, times: int):
        self.left = times

    def maybe_raise(self, step: int) -> None:
        if step == 3 and self.left:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (smoke: injected, no GPU memory to reserve)")


def row_real_oom(c: Check, row: Row) -> None:
    from pillsnap.train.loops.members import classifier_member, run_policy
    from pillsnap.train.services.oom_state_machine import FaultInjector

    cfg, subset, cmap = c.stage
    cfg = c.config("optimization.torch_compile=none")  # the state machine is what is measured, not the compiler
    injector = _SmokeOom(2) if c.smoke else FaultInjector()
    member = classifier_member(cfg, subset, cmap, c.work / "oom", run_policy(cfg), show_progress=False,
                               injectors={"classifier": injector})
    unit, stream = member.unit, member.stream
    unit.plan_schedule(1000)
    hog, steps = None, 0
    try:
        for step in range(1, 9):
            if stream.epoch_done:
                stream.new_epoch()
            window, consumed = stream.next_window(max(1, unit.global_batch // stream.batch_size))
            if step == 2 and c.cuda:  # measured once AdamW's state exists: what one step needs on top
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            if member.guard.step(window, step, 1, lambda: c.work / "oom" / "emergency-not-saved") is None:
                # S3: the same samples again at the new global batch
                stream.rewind(consumed)
                stream.set_batch_size(unit.batch_size)
                continue
            steps += 1
            if step == 2 and c.cuda:  # leave free 70 % of that: the configured batch cannot fit, half of it can
                need = torch.cuda.max_memory_allocated() - base
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info()
                hog = torch.empty(max(0, free - int(0.7 * need)), dtype=torch.uint8, device="cuda")
                row.measured.update(step_need_mib=round(need / 2**20), left_free_mib=round(0.7 * need / 2**20))
    finally:
        del hog
        stream.close()
        if c.cuda:
            torch.cuda.empty_cache()
    events = member.guard.events
    row.measured.update(actions=[e["action"] for e in events], steps_after=steps - 2,
                        micro_batch=f"{unit.batch_size}x{unit.accum}",
                        first_error=events[0]["error"][:120] if events else "")
    real = bool(events) and "out of memory" in events[0]["error"].lower() and "inject" not in events[0]["error"]
    ok = bool(events) and steps >= 6 and all(e["action"] != "emergency_exit" for e in events)
    row.status = "pass" if ok and (real or c.smoke) else "fail"


def row_augmentation(c: Check, row: Row) -> None:
    import numpy as np
    from PIL import Image

    from pillsnap.config import AugmentConfig
    from pillsnap.data.augment import BatchAugment

    cfg, subset, _ = c.stage
    size = cfg.classification.image_size
    photos = subset[subset["kind"] == "single"]["image_path"].head(16)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size))))
                          .permute(2, 0, 1) for p in photos])
    n = len(images)
    seeds, boxes = torch.arange(n) + 1000, torch.tensor([[0.5, 0.5, 0.3, 0.3]] * n)
    labels = torch.zeros(n, dtype=torch.long)
    ok = True
    geometry_only = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, channel_gain=0)
    for name, aug in (("geometry", geometry_only), ("shipped", AugmentConfig())):
        cpu, _ = BatchAugment(aug, size, 3)(images, seeds, boxes, labels)
        gpu, _ = BatchAugment(aug, size, 3)(images.cuda(), seeds, boxes, labels.cuda())
        diff = (cpu - gpu.float().cpu()).abs().flatten()
        mean, p99 = float(diff.mean()), float(torch.quantile(diff[:: max(1, diff.numel() // 1_000_000)], 0.99))
        row.measured[name] = {"mean_abs": round(mean, 4), "p99_abs": round(p99, 4)}
        ok &= mean < AUGMENT_MEAN and p99 < AUGMENT_P99
    row.status = "pass" if ok else "fail"


def _bench(c: Check, script: str, args: List[str]) -> Dict[str, Any]:
    out = c.work / f"{Path(script).stem}.json"
    done = subprocess.run([sys.executable, script, *args, "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} exited {done.returncode}: {done.stderr[-800:]}")
    c.bench[script] = json.loads(out.read_text())
    return c.bench[script]


def _bench_batch(c: Check) -> int:
    plan = c.plans.get("classifier", {}).get("batch") or {}
    return min(64, int(plan.get("batch_size") or 64)) if c.cuda else 8


def row_train_step(c: Check, row: Row) -> None:
    args = ["--batch", str(_bench_batch(c))]
    if c.smoke:
        args += ["--model", "test_efficientnet", "--size", "64", "--blocks", "2", "--steps", "2", "--warmup", "1"]
    result = _bench(c, "bench/train_step.py", args)
    row.measured.update(images_per_s={k: round(v, 1) for k, v in result["images_per_s"].items()},
                        ratio_ceiling=result["ratio_ceiling"], model=result["model"], size=result["size"],
                        batch=result["batch"])
    ratio = result["ratio_ceiling"]  # None on a CPU: no device-resident ceiling to compare with
    row.status = "pass" if (ratio is None and c.smoke) or (ratio is not None and ratio >= STEP_CEILING_GOAL) else "fail"


def row_data_pipeline(c: Check, row: Row) -> None:
    step = (c.bench.get("bench/train_step.py") or {}).get("images_per_s", {}).get("ours")
    if step is None:
        row.status, row.note = "fail", "the train step bench gave no rate to compare with"
        return
    cfg = c.stage[0]
    args = ["--batch", str(_bench_batch(c))]
    args += (["--images", "40", "--size", "64", "--workers", "0", "--passes", "1"] if c.smoke else
             ["--images", "400", "--size", str(cfg.classification.image_size), "--workers",
              str(cfg.dataloader.num_workers), "--passes", "2"])
    loader = _bench(c, "bench/data_pipeline.py", args)["images_per_s"]["uint8 batches"]
    ratio = loader / step
    row.measured.update(loader_img_s=round(loader, 1), step_img_s=round(step, 1), ratio=round(ratio, 2))
    row.status = "pass" if c.smoke or ratio >= LOADER_GOAL else "fail"


ALWAYS, GPU, PATH = "always", "gpu", "path"  # PATH rows run on CUDA, or at tiny sizes in a CPU smoke run
ROWS: List[tuple] = [
    ("environment", "a CUDA GPU with bf16", ALWAYS, row_environment),
    ("photos", "976x1280 synthetic photos imported", PATH, row_photos),
    ("gpu tests", "pytest tests/gpu passes, nothing skipped", GPU, row_gpu_tests),
    ("auto batch", "probed; peak <= headroom of the GPU", PATH, row_auto_batch),
    ("stage 1", "shipped path trains both models compiled", PATH, row_stage),
    ("nvml in D-10", "both models' lines show nvml=MB", GPU, row_nvml),
    ("real OOM", "a real CUDA OOM recovered by D-8", PATH, row_real_oom),
    ("augmentation", f"GPU vs CPU mean < {AUGMENT_MEAN}, p99 < {AUGMENT_P99}", GPU, row_augmentation),
    ("train step", f"ours / model-only ceiling >= {STEP_CEILING_GOAL}", PATH, row_train_step),
    ("data pipeline", f"loader / step img/s >= {LOADER_GOAL}", PATH, row_data_pipeline),
]


def run_rows(c: Check) -> List[Row]:
    rows = []
    for name, goal, kind, fn in ROWS:
        row = Row(name, goal)
        rows.append(row)
        if (kind == GPU and not c.cuda) or (kind == PATH and not c.runs):
            row.status = "no CUDA"
            continue
        if kind != ALWAYS and name != "photos" and c.stage is None:
            row.note = "no photos (see the photos row)"
            continue
        start = time.perf_counter()
        try:
            fn(c, row)
        except Exception as exc:  # noqa: BLE001 - a broken row is reported and the others still run
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        row.seconds = round(time.perf_counter() - start, 1)
        if c.smoke and row.status in ("pass", "fail"):
            row.status = f"smoke {row.status}"
        print(f"[gpu-check] {row.name}: {row.status} ({row.seconds}s)", flush=True)
    return rows


def exit_code(c: Check, rows: List[Row]) -> int:
    if any(r.status in ("fail", "error", "smoke fail") for r in rows):
        return 1
    return 0 if c.cuda else NO_CUDA_EXIT


def table(rows: List[Row]) -> str:
    def short(row: Row) -> str:
        text = json.dumps(row.measured, default=str)
        return text if len(text) <= 110 else text[:107] + "..."

    lines = [f"{'row':14s} {'status':11s} {'s':>6s}  goal / measured"]
    for r in rows:
        lines.append(f"{r.name:14s} {r.status:11s} {r.seconds:6.1f}  {r.goal}")
        if r.measured:
            lines.append(f"{'':34s}{short(r)}")
        if r.note:
            lines.append(f"{'':34s}note: {r.note.splitlines()[0][:110]}")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "gpu-check.json")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per model and epoch (2 epochs)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--photos-per-class", type=int, default=60)
    p.add_argument("--combinations", type=int, default=24)
    p.add_argument("--cpu-smoke", action="store_true", help="without CUDA: run every row at tiny sizes on the CPU")
    p.add_argument("--work", type=Path, help="keep the run's files here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.cpu_smoke and not torch.cuda.is_available():
        args.steps, args.classes, args.photos_per_class, args.combinations = 3, 4, 12, 3
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from pillsnap.core.jsonio import write_json_atomic
    from pillsnap.environment import prepare_process

    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pillsnap-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in ("YOLO_OFFLINE", "HF_HUB_OFFLINE"):  # a GPU machine may have no network: never wait on it
            os.environ.setdefault(name, "1")
        prepare_process(work / "exp")  # before ultralytics is imported: its settings go inside the run's folder
        check = Check(args, work)
        rows = run_rows(check)
    code = exit_code(check, rows)
    seconds = round(time.perf_counter() - start, 1)
    print(table(rows))
    verdict = {0: "ACCEPTED", 1: "NOT ACCEPTED", NO_CUDA_EXIT: "no CUDA: nothing accepted"}[code]
    print(f"gpu-check: {verdict} in {seconds}s; {args.out}")
    write_json_atomic(args.out, {"verdict": verdict, "exit_code": code, "seconds": seconds, "cuda": check.cuda,
                                 "smoke": check.smoke, "rows": [asdict(r) for r in rows]})
    return code


if __name__ == "__main__":
    sys.exit(main())
