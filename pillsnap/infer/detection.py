"""Detection at run time, shared by training validation, evaluation, export parity and serving (D-6: ONE NMS).

Pipeline: BGR image -> `letterbox` (the same resize + centred 114-grey padding as ultralytics' val loader) ->
raw head output (B, 4+nc, N) from a torch model or an ONNX session -> `nms` (numpy, one implementation) ->
boxes mapped back to original pixels. `evaluate_detector` scores a Detector with pillsnap.metrics.detection.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd

from pillsnap.data.manifest import boxes_of
from pillsnap.metrics.detection import IOU_THRESHOLDS, box_iou, detection_metrics, match_detections

MAP_CONF, MAP_IOU, MAP_MAX_DET = 0.001, 0.7, 300  # the mAP protocol (ultralytics val); not the serving thresholds
PAD_VALUE = 114
READ_THREADS = 4  # photos decoded ahead of the model during validation
RawPredictor = Callable[[np.ndarray], np.ndarray]  # (B, 3, S, S) float32 RGB in [0, 1] -> (B, 4+nc, N)


@dataclass(frozen=True)
class LetterboxInfo:
    scale_w: float  # resized width / original width
    scale_h: float
    pad_left: int
    pad_top: int
    width: int  # original size
    height: int

@dataclass(frozen=True)
class DetSample:
    image_path: str
    boxes: np.ndarray  # (M, 4) ground truth, xyxy original pixels

def load_bgr(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image

def letterbox(image_bgr: np.ndarray, size: int) -> Tuple[np.ndarray, LetterboxInfo]:
    """(3, size, size) float32 RGB in [0, 1]: long side resized to `size`, then centred on grey."""
    h0, w0 = image_bgr.shape[:2]
    r = size / max(h0, w0)
    image = image_bgr
    if r != 1:
        w, h = min(math.ceil(w0 * r), size), min(math.ceil(h0 * r), size)
        image = cv2.resize(image_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
    h, w = image.shape[:2]
    dw, dh = (size - w) / 2, (size - h) / 2
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    chw = np.ascontiguousarray(image.transpose(2, 0, 1)[::-1], dtype=np.float32) / 255.0
    return chw, LetterboxInfo(w / w0, h / h0, left, top, w0, h0)

def unletterbox(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    out = boxes.copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - info.pad_left) / info.scale_w).clip(0, info.width)
    out[:, [1, 3]] = ((out[:, [1, 3]] - info.pad_top) / info.scale_h).clip(0, info.height)
    return out

def nms(raw: np.ndarray, conf: float, iou: float, max_det: int, max_nms: int = 30000) -> np.ndarray:
    """ONE image's raw head output (4+nc, N), xywh + class scores -> (K, 6) xyxy, conf, class; best first.

    Greedy per-class NMS (a box is dropped when its IoU with a kept box of its class exceeds `iou`), the same
    rule as torchvision.ops.nms inside ultralytics; shared by the torch and ONNX paths.
    """
    raw = np.asarray(raw, dtype=np.float32)
    scores = raw[4:].T
    best, cls = scores.max(1), scores.argmax(1)
    keep = best > conf
    xywh, best, cls = raw[:4].T[keep], best[keep], cls[keep]
    order = np.argsort(-best, kind="stable")[:max_nms]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)[order]
    best, cls = best[order], cls[order]
    shifted = boxes + (cls * 7680.0)[:, None]  # separate classes by offsetting them apart
    kept: List[int] = []
    candidates = np.arange(len(boxes))
    while candidates.size and len(kept) < max_det:
        i, rest = candidates[0], candidates[1:]
        kept.append(int(i))
        candidates = rest[box_iou(shifted[i:i + 1], shifted[rest])[0] <= iou]
    kept_idx = np.asarray(kept, dtype=np.int64)
    return np.concatenate([boxes[kept_idx], best[kept_idx, None], cls[kept_idx, None].astype(np.float32)], 1)

def torch_raw_predictor(model, device: Optional[str] = None) -> RawPredictor:
    """fp32, no autocast (D-6), on the model's own device unless one is given."""
    import torch

    model = (model.to(device) if device else model).eval()
    where = next(model.parameters()).device

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(batch).to(where))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().cpu().numpy()

    return predict

def onnx_raw_predictor(onnx_path: str | Path, providers: Optional[Sequence[str]] = None) -> RawPredictor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=list(providers or ["CPUExecutionProvider"]))
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch.astype(np.float32)})[0]

class Detector:
    """Images in, boxes out (original pixels): letterbox -> raw predictor -> shared NMS -> unletterbox."""

    def __init__(self, predict_raw: RawPredictor, image_size: int, conf: float, iou: float, max_det: int,
                 batch_size: int = 8):
        self.predict_raw, self.image_size, self.batch_size = predict_raw, image_size, batch_size
        self.conf, self.iou, self.max_det = conf, iou, max_det

    def __call__(self, images_bgr: Sequence[np.ndarray]) -> List[np.ndarray]:
        results: List[np.ndarray] = []
        for start in range(0, len(images_bgr), self.batch_size):
            chunk = [letterbox(im, self.image_size) for im in images_bgr[start:start + self.batch_size]]
            raw = self.predict_raw(np.stack([c[0] for c in chunk]))
            for out, (_, info) in zip(raw, chunk):
                det = nms(out, self.conf, self.iou, self.max_det)
                det[:, :4] = unletterbox(det[:, :4], info)
                results.append(det)
        return results

def detection_samples(rows: pd.DataFrame) -> List[DetSample]:
    """Ground truth from manifest rows: every pill box as xyxy pixels."""
    samples = []
    for _, row in rows.iterrows():
        boxes = np.array([b["bbox"] for b in boxes_of(row)], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        samples.append(DetSample(str(row["image_path"]), boxes))
    return samples

def evaluate_detector(detect: Detector, samples: Sequence[DetSample], conf_threshold: Optional[float] = None,
                      rank: int = 0, world: int = 1,
                      gather: Optional[Callable[[Any], List[Any]]] = None) -> Dict:
    """Run `detect` over the samples and score it; `detect` should use the mAP protocol thresholds. With several
    ranks each scores photos rank, rank + world, ... and `gather` (every rank's object, in rank order, on every
    rank) brings each photo's matches together in photo order: the figures of one process. Photos are read by a
    few threads while the model runs (OpenCV decodes without the GIL)."""
    mine = range(rank, len(samples), world)
    scored: Dict[int, Tuple[np.ndarray, np.ndarray, int]] = {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as readers:
        for start in range(0, len(mine), detect.batch_size):
            chunk = mine[start:start + detect.batch_size]
            images = list(readers.map(load_bgr, [samples[i].image_path for i in chunk]))
            for i, det in zip(chunk, detect(images)):
                scored[i] = (match_detections(det, samples[i].boxes), det[:, 4], len(samples[i].boxes))
    merged = {i: row for part in (gather(scored) if gather else [scored]) for i, row in part.items()}
    if len(merged) != len(samples):  # a rank that scored other photos would make figures of some other set
        raise RuntimeError(f"detector validation: the ranks scored {len(merged)} of {len(samples)} photos")
    rows = [merged[i] for i in range(len(samples))]
    tp = np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, len(IOU_THRESHOLDS)), bool)
    conf = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0)
    return {**detection_metrics(tp, conf, sum(r[2] for r in rows), conf_threshold), "n_images": len(samples)}

def map_detector(model_or_predictor, image_size: int, batch_size: int = 8) -> Detector:
    """A Detector with the mAP protocol thresholds, from a torch model or any raw predictor callable."""
    predict = model_or_predictor if not hasattr(model_or_predictor, "state_dict") else \
        torch_raw_predictor(model_or_predictor)
    return Detector(predict, image_size, MAP_CONF, MAP_IOU, MAP_MAX_DET, batch_size)

def serving_detector(model_or_predictor, det_cfg, batch_size: int = 8) -> Detector:
    """A Detector with the serving thresholds of the config (detection.conf_threshold, iou_threshold, max_det)."""
    predict = model_or_predictor if not hasattr(model_or_predictor, "state_dict") else \
        torch_raw_predictor(model_or_predictor)
    return Detector(predict, det_cfg.image_size, det_cfg.conf_threshold, det_cfg.iou_threshold, det_cfg.max_det,
                    batch_size)
