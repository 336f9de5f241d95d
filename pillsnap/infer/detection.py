"""Detection at run time, shared by training validation, evaluation, export parity and serving (D-6: ONE NMS).

Pipeline: BGR image -> `letterbox` (the same resize + centred 114-grey padding as ultralytics' val loader) ->
raw head output (B, 4+nc, N) from a torch model or an ONNX session -> `nms_batch` (torchvision's, on the output's
device: one implementation) -> boxes mapped back to original pixels. `evaluate_detector` scores a Detector with
pillsnap.metrics.detection; during training it reads the photos from the detector's decode-once store.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
import torch
import torchvision

from pillsnap.data.detector_store import fitted_shape
from pillsnap.data.manifest import boxes_of
from pillsnap.metrics.detection import IOU_THRESHOLDS, detection_metrics, match_detections

MAP_CONF, MAP_IOU, MAP_MAX_DET = 0.001, 0.7, 300  # the mAP protocol (ultralytics val); not the serving thresholds
PAD_VALUE = 114
READ_THREADS = 4  # photos decoded ahead of the model during validation
RawPredictor = Callable[[np.ndarray], Any]  # (B, 3, S, S) float32 RGB in [0, 1] -> (B, 4+nc, N) array or tensor


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
    shape: Tuple[int, int] = (0, 0)  # (height, width) the label gives


@dataclass(frozen=True)
class FittedPhoto:
    """A photo already resized as `letterbox` resizes it (a detector store row's content), with its original size."""
    image: np.ndarray
    original_hw: Tuple[int, int]


def load_bgr(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return image

def letterbox(image_bgr: np.ndarray | FittedPhoto, size: int) -> Tuple[np.ndarray, LetterboxInfo]:
    """(3, size, size) float32 RGB in [0, 1]: long side resized to `size` (unless fitted already), then centred on
    grey."""
    if isinstance(image_bgr, FittedPhoto):
        (h0, w0), image = image_bgr.original_hw, image_bgr.image
        if image.shape[:2] != fitted_shape(h0, w0, size):
            raise ValueError(f"a fitted photo of {image.shape[1]}x{image.shape[0]} is not a {w0}x{h0} photo "
                             f"fitted to {size} px")
    else:
        (h0, w0), image = image_bgr.shape[:2], image_bgr
        h, w = fitted_shape(h0, w0, size)
        if (h, w) != (h0, w0):
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

def nms(raw, conf: float, iou: float, max_det: int, max_nms: int = 30000) -> np.ndarray:
    """ONE image's raw head output (4+nc, N), xywh + class scores -> (K, 6) xyxy, conf, class; best first."""
    return nms_batch(torch.as_tensor(raw)[None], conf, iou, max_det, max_nms)[0]

def nms_batch(raw, conf: float, iou: float, max_det: int, max_nms: int = 30000) -> List[np.ndarray]:
    """A batch's raw head output (B, 4+nc, N) -> per image (K, 6) xyxy, conf, class; best first.

    Per-class greedy NMS (a box goes when its IoU with a kept box of its class exceeds `iou`): torchvision's, as
    inside ultralytics, on the tensor's own device (the GPU during training validation), the whole batch in one
    call with (image, class) as the group. THE one NMS of the torch and ONNX paths (D-6).
    """
    raw = torch.as_tensor(raw).float()
    if raw.ndim != 3:
        raise ValueError(f"nms_batch: raw head output must be (B, 4+nc, N), got {tuple(raw.shape)}")
    scores = raw[:, 4:].transpose(1, 2)  # (B, N, nc)
    best, cls = scores.max(2)
    picked, groups, nc = [], [], scores.shape[2]
    for b in range(raw.shape[0]):
        keep = torch.nonzero(best[b] > conf).flatten()
        keep = keep[torch.argsort(best[b, keep], descending=True, stable=True)[:max_nms]]
        picked.append(keep)
        groups.append(b * nc + cls[b, keep])
    image = torch.cat([torch.full_like(k, b) for b, k in enumerate(picked)])
    anchor = torch.cat(picked)
    xywh = raw[image, :4, anchor]
    boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    score, label = best[image, anchor], cls[image, anchor]
    kept = torchvision.ops.batched_nms(boxes, score, torch.cat(groups), iou)  # best first, over the batch
    rows = torch.cat([boxes, score[:, None], label[:, None].float()], 1)[kept].cpu().numpy()
    owner = image[kept].cpu().numpy()
    return [rows[owner == b][:max_det] for b in range(raw.shape[0])]

def torch_raw_predictor(model, device: Optional[str] = None, on_device: bool = False) -> RawPredictor:
    """fp32, no autocast (D-6), on the model's own device unless one is given. `on_device`: the output stays a
    tensor where the model ran (the NMS runs there), else a numpy array."""
    model = (model.to(device) if device else model).eval()
    where = next(model.parameters()).device

    def predict(batch: np.ndarray):
        with torch.no_grad():
            out = model(torch.from_numpy(batch).to(where))
        out = (out[0] if isinstance(out, (tuple, list)) else out).float()
        return out if on_device else out.cpu().numpy()

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

    def __call__(self, images_bgr: Sequence[np.ndarray | FittedPhoto]) -> List[np.ndarray]:
        results: List[np.ndarray] = []
        for start in range(0, len(images_bgr), self.batch_size):
            chunk = [letterbox(im, self.image_size) for im in images_bgr[start:start + self.batch_size]]
            raw = self.predict_raw(np.stack([c[0] for c in chunk]))
            for det, (_, info) in zip(nms_batch(raw, self.conf, self.iou, self.max_det), chunk):
                det[:, :4] = unletterbox(det[:, :4], info)
                results.append(det)
        return results

def detection_samples(rows: pd.DataFrame) -> List[DetSample]:
    """Ground truth from manifest rows: every pill box as xyxy pixels."""
    samples = []
    for _, row in rows.iterrows():
        boxes = np.array([b["bbox"] for b in boxes_of(row)], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        samples.append(DetSample(str(row["image_path"]), boxes, (int(row["height"]), int(row["width"]))))
    return samples

class StoredPhotos:
    """`evaluate_detector`'s `read` from the detector's decode-once store: sample i's row, cut to the photo's fitted
    size (from the label's size: validation quarantines a photo whose file disagrees with it). A sample the store
    has no row for is read from its file."""

    def __init__(self, samples: Sequence[DetSample], store: Any, rows: Sequence[int]):
        self.samples, self.store, self.rows = samples, store, np.asarray(rows, dtype=np.int64)

    def __call__(self, i: int) -> np.ndarray | FittedPhoto:
        sample, row = self.samples[i], int(self.rows[i])
        if not self.store.has(row) or not all(sample.shape):
            return load_bgr(sample.image_path)
        h, w = fitted_shape(*sample.shape, self.store.size)
        return FittedPhoto(self.store.get(row)[:h, :w], sample.shape)


def evaluate_detector(detect: Detector, samples: Sequence[DetSample], conf_threshold: Optional[float] = None,
                      rank: int = 0, world: int = 1, gather: Optional[Callable[[Any], List[Any]]] = None,
                      read: Optional[Callable[[int], np.ndarray | FittedPhoto]] = None) -> Dict:
    """Run `detect` over the samples and score it; `detect` should use the mAP protocol thresholds. With several
    ranks each scores photos rank, rank + world, ... and `gather` (every rank's object, in rank order, on every
    rank) brings each photo's matches together in photo order: the figures of one process. `read(i)`: sample i's
    photo (default: decoded from its file), read by a few threads while the model runs (OpenCV decodes and
    preadv reads without the GIL)."""
    mine = range(rank, len(samples), world)
    read = read or (lambda i: load_bgr(samples[i].image_path))
    scored: Dict[int, Tuple[np.ndarray, np.ndarray, int]] = {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as readers:
        for start in range(0, len(mine), detect.batch_size):
            chunk = mine[start:start + detect.batch_size]
            images = list(readers.map(read, chunk))
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
        torch_raw_predictor(model_or_predictor, on_device=True)
    return Detector(predict, image_size, MAP_CONF, MAP_IOU, MAP_MAX_DET, batch_size)

def serving_detector(model_or_predictor, det_cfg, batch_size: int = 8) -> Detector:
    """A Detector with the serving thresholds of the config (detection.conf_threshold, iou_threshold, max_det)."""
    predict = model_or_predictor if not hasattr(model_or_predictor, "state_dict") else \
        torch_raw_predictor(model_or_predictor, on_device=True)
    return Detector(predict, det_cfg.image_size, det_cfg.conf_threshold, det_cfg.iou_threshold, det_cfg.max_det,
                    batch_size)
