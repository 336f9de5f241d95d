"""Latency of the prediction pipeline per mode (single | combo | auto): torch vs ONNX Runtime on the CPU.

A benchmark, not a test: it builds its own tiny models (random-init timm `test_efficientnet` classifier and a
YOLO11n detector at a small input size), exports them to ONNX, writes a few synthetic photos, warms up, then
times `Predictor.predict` (decode + preprocessing + models + NMS + crops) and prints p50/p95 per mode and engine,
and the ONNX/torch ratio of the same run. Both engines get the same thread count (--threads).

Random detector weights score every box near zero, so the serving detector here keeps the top --pills boxes
(conf 0): combo and auto then classify that many crops per photo, the work a real multi-pill photo costs. With
the default auto threshold a random classifier is never confident, so auto = whole-image classification + combo.

    .venv/bin/python bench/latency.py [--runs 30] [--threads 1] [--cls-size 128] [--det-size 320] [--pills 4]

--threads defaults to 1: on a CPU shared with other jobs, more intra-op threads than idle cores make torch stall
(p95 in seconds, the whole run past two minutes); raise it only on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("YOLO_OFFLINE", "1")
MODES = ("single", "combo", "auto")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30, help="timed predictions per mode and engine")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for torch AND ONNX Runtime")
    p.add_argument("--cls-size", type=int, default=128)
    p.add_argument("--det-size", type=int, default=320)
    p.add_argument("--pills", type=int, default=4, help="boxes the detector keeps per photo")
    p.add_argument("--classes", type=int, default=50)
    return p.parse_args()


def synthetic_photos(root: Path) -> List[str]:
    from pillsnap.config import SynthConfig
    from pillsnap.data.synth import synthesize

    cfg = SynthConfig(num_classes=4, images_per_class=2, test_images_per_class=0, combinations=2,
                      test_combinations=0, images_per_combination=2, width=488, height=640, workers=1)
    synthesize(cfg, root, show_progress=False)
    return sorted(str(p) for p in root.rglob("*.png"))


def build_models(work: Path, args: argparse.Namespace):
    import timm
    import torch

    from pillsnap.config import DetectionConfig
    from pillsnap.infer.onnx_files import export_classifier_onnx
    from pillsnap.models.detector import build_detector, export_detector_onnx

    torch.manual_seed(0)
    classifier = timm.create_model("test_efficientnet", pretrained=False, num_classes=args.classes).eval()
    detector = build_detector(DetectionConfig(scale="n", image_size=args.det_size, pretrained=False), work / "det").eval()
    cls_onnx = export_classifier_onnx(classifier, work / "classifier.onnx", args.cls_size, 17, True)
    det_onnx = export_detector_onnx(detector, work / "detector.onnx", args.det_size, 17, True)
    return classifier, detector, cls_onnx, det_onnx


def predictors(classifier, detector, cls_onnx: Path, det_onnx: Path, args: argparse.Namespace) -> Dict[str, object]:
    from pillsnap.data.class_map import ClassMap
    from pillsnap.infer.detection import Detector, torch_raw_predictor
    from pillsnap.infer.engines import OnnxClassifierEngine, TorchClassifierEngine
    from pillsnap.infer.onnx_files import onnx_session
    from pillsnap.infer.predict import Predictor

    labels = ClassMap.from_codes([f"K-{i:06d}" for i in range(args.classes)])
    session = onnx_session(det_onnx, threads=args.threads)
    onnx_raw = lambda batch: session.run(None, {"images": batch.astype(np.float32)})[0]  # noqa: E731

    def make(engine, raw) -> Predictor:
        loader = lambda: Detector(raw, args.det_size, 0.0, 0.5, args.pills)  # noqa: E731
        return Predictor(engine, labels, args.cls_size, 0.15, 0.30, loader, lazy_detector=False)

    return {"torch": make(TorchClassifierEngine(classifier), torch_raw_predictor(detector)),
            "onnx": make(OnnxClassifierEngine(cls_onnx, threads=args.threads), onnx_raw)}


def percentiles(run: Callable[[str], object], photos: List[str], warmup: int, runs: int) -> Dict[str, float]:
    for i in range(warmup):
        run(photos[i % len(photos)])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        run(photos[i % len(photos)])
        times.append((time.perf_counter() - start) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pillsnap-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics"))
        photos = synthetic_photos(work / "photos")
        classifier, detector, cls_onnx, det_onnx = build_models(work, args)
        engines = predictors(classifier, detector, cls_onnx, det_onnx, args)
        setup = time.perf_counter() - started
        results = {(engine, mode): percentiles(lambda p: predictor.predict(p, mode), photos, args.warmup, args.runs)
                   for mode in MODES for engine, predictor in engines.items()}
        crops = {m: len(engines["onnx"].predict(photos[0], m)["pills"]) for m in MODES}
    print(f"PillSnap latency: classifier test_efficientnet {args.cls_size}px ({args.classes} classes), detector "
          f"YOLO11n {args.det_size}px keeping {args.pills} boxes; {len(photos)} synthetic 488x640 photos; "
          f"{args.threads} thread(s) per engine; {args.warmup} warm-up + {args.runs} timed runs per cell")
    print(f"{'mode':<8}{'pills':>6}{'torch p50':>12}{'torch p95':>12}{'onnx p50':>12}{'onnx p95':>12}"
          f"{'onnx/torch p50':>16}")
    for mode in MODES:
        t, o = results[("torch", mode)], results[("onnx", mode)]
        print(f"{mode:<8}{crops[mode]:>6}{t['p50']:>10.1f}ms{t['p95']:>10.1f}ms{o['p50']:>10.1f}ms{o['p95']:>10.1f}ms"
              f"{o['p50'] / t['p50']:>16.2f}")
    print(f"setup {setup:.1f}s, total {time.perf_counter() - started:.1f}s (ms per photo, end to end: decode, "
          f"preprocessing, models, NMS, crops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
