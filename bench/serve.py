"""The HTTP API against the in-process pipeline, same models, same photos, same run.

A benchmark, not a test. It builds a small trained stage (synthetic photos at the demo's size, a classifier trained
for a step or two - by default the shipped EfficientNetV2-S at 224 px, what a CPU box would serve -, a YOLO11n
detector, ONNX export), then:
  in-process   pillsnap.infer.predict.Predictor.predict(photo) in this process;
  http         a real client (httpx, keep-alive) posting the same photo files to `pillsnap serve` (uvicorn) on
               127.0.0.1, sequentially, then from N concurrent clients.
p50 / p95 per request and throughput for single and combo mode. Goal: HTTP p50 <= 1.3x in-process p50 (single).
The load is bounded (requests and seconds) and goes to 127.0.0.1 only; the server is stopped at the end.

    .venv/bin/python bench/serve.py [--engine onnx] [--requests 60] [--clients 4] [--backbone B] [--size S]

With the demo's tiny classifier (--backbone mobilenetv3_small_100 --size 96) a prediction costs ~4 ms, less than
twice a bare HTTP round trip on a shared 2-core box: the absolute overhead in ms is printed for that case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET = 1.3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="onnx", choices=["torch", "onnx"])
    p.add_argument("--requests", type=int, default=60, help="timed requests per mode and side")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients for the throughput run")
    p.add_argument("--budget-s", type=float, default=120, help="time limit of each load run")
    p.add_argument("--backbone", default="tf_efficientnetv2_s")
    p.add_argument("--size", type=int, default=224, help="classifier input size")
    return p.parse_args()


def build_stage(work: Path, backbone: str = "tf_efficientnetv2_s", size: int = 224):
    """A small trained stage in an experiment dir, exported: what `pillsnap serve --stage 1` loads."""
    from pillsnap.config import load_config
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path, run_import, run_subset
    from pillsnap.data.subsets import read_subset
    from pillsnap.data.synth import synthesize
    from pillsnap.infer.export import export_stage
    from pillsnap.train import train_stage

    cfg = load_config(profile="cpu-demo", overrides=[
        f"paths.exp_dir={work / 'exp'}", f"synth.out_dir={work / 'aihub'}", "synth.num_classes=8",
        "synth.images_per_class=12", "synth.images_per_class_min=12", "synth.combinations=4", "synth.test_combinations=0",
        "synth.test_images_per_class=0", "data.stages.1.classes=8", "data.stages.1.images=80",
        "train.strategy=sequential", "train.classification.epochs=1", "train.detection.epochs=1",
        "logging.tensorboard=false", "logging.progress_bar=false",
        "serve.require_api_key=true", f"classification.backbone={backbone}", f"classification.image_size={size}",
        "train.max_steps_per_epoch=1", "export.parity_samples=8"])
    synthesize(cfg.synth, work / "aihub", show_progress=False)
    run_import(cfg, show_progress=False)
    run_subset(cfg, 1)
    subset, _ = read_subset(cfg.exp_dir, 1)
    stage_dir = cfg.exp_dir / "stage_1"
    train_stage(cfg, subset, ClassMap.load(class_map_path(cfg)), 1, stage_dir, show_progress=False)
    export_stage(cfg, 1)
    val = subset[subset["split"] == "val"].sort_values("image_id")
    return cfg, list(val.loc[val["kind"] == "single", "image_path"]), \
        list(val.loc[val["kind"] == "combination", "image_path"]) or list(subset.loc[subset["kind"] == "combination",
                                                                                     "image_path"])


def timed(run: Callable[[str], object], photos: List[str], n: int, warmup: int = 5) -> List[float]:
    for i in range(warmup):
        run(photos[i % len(photos)])
    times = []
    for i in range(n):
        start = time.perf_counter()
        run(photos[i % len(photos)])
        times.append((time.perf_counter() - start) * 1000)
    return times


def concurrent(run: Callable[[str], object], photos: List[str], n: int, clients: int, budget_s: float):
    deadline, times = time.monotonic() + budget_s, []

    def worker(part: List[str]) -> None:
        for path in part:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            run(path)
            times.append((time.perf_counter() - start) * 1000)

    order = [photos[i % len(photos)] for i in range(n)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(worker, [order[i::clients] for i in range(clients)]))
    return times, len(times) / (time.perf_counter() - started)


def summary(times: List[float]) -> Dict[str, float]:
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95)),
            "img_s": 1000 / statistics.mean(times)}


def main() -> int:
    import httpx

    from pillsnap.infer.predict import load_predictor
    from pillsnap.serve.smoke import post_photo, running_server

    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-serve-") as tmp:
        cfg, singles, combos = build_stage(Path(tmp), args.backbone, args.size)
        setup_s = time.perf_counter() - started
        local = load_predictor(cfg, 1, args.engine)
        rows = {}
        with running_server(cfg, 1, args.engine, timeout_s=180) as server, httpx.Client() as client:
            for mode, photos in (("single", singles), ("combo", combos)):
                ours = timed(lambda p: local.predict(p, mode), photos, args.requests)
                http = timed(lambda p: post_photo(client, server, p, mode), photos, args.requests)
                rows[mode] = (summary(ours), summary(http))
            clients = threading.local()

            def threaded_post(path: str):
                if not hasattr(clients, "client"):
                    clients.client = httpx.Client()  # one keep-alive connection per client thread
                return post_photo(clients.client, server, path, "single")

            load_times, load_rate = concurrent(threaded_post, singles, args.requests * 2, args.clients,
                                               args.budget_s)
            local_times, local_rate = concurrent(lambda p: local.predict(p, "single"), singles, args.requests * 2,
                                                 args.clients, args.budget_s)
    print(f"PillSnap API vs in-process pipeline: engine {args.engine}, classifier {cfg.classification.backbone} "
          f"{cfg.classification.image_size}px, detector YOLO11{cfg.detection.scale} {cfg.detection.image_size}px, "
          f"{cfg.synth.width}x{cfg.synth.height} photos; {args.requests} timed requests per cell (setup {setup_s:.0f}s)")
    print(f"{'mode':<8}{'in-proc p50':>12}{'p95':>9}{'http p50':>11}{'p95':>9}{'overhead p50':>14}"
          f"{'http/in-proc p50':>18}")
    for mode, (ours, http) in rows.items():
        print(f"{mode:<8}{ours['p50']:>10.1f}ms{ours['p95']:>7.1f}ms{http['p50']:>9.1f}ms{http['p95']:>7.1f}ms"
              f"{http['p50'] - ours['p50']:>12.1f}ms{http['p50'] / ours['p50']:>18.2f}")
    lp = summary(load_times)
    print(f"{args.clients} concurrent clients, single: http {load_rate:.1f} img/s (p50 {lp['p50']:.1f} ms, p95 "
          f"{lp['p95']:.1f} ms), in-process threads {local_rate:.1f} img/s")
    ratio = rows["single"][1]["p50"] / rows["single"][0]["p50"]
    print(f"ratio http/in-process p50 (single) = {ratio:.2f}  target <= {TARGET}: {'PASS' if ratio <= TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
