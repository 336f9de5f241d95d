"""The prediction pipeline: single | combo | auto, on the torch or the ONNX Runtime engine.

single  classify the whole photo.
combo   detect every pill, crop EACH detection (classification.crop_padding, the training crop rule), classify all
        crops in batches, report each pill with its box in original pixels (an earlier implementation
        classified only the first detection; here the pill list has one entry per detection).
auto    classify the whole photo, then route (see `pillsnap.infer.gating`): low confidence or a multi-object hint
        falls back to combo; `mode_used`, `fallback_reason`, `gating_score` and `single_confidence` are recorded.
        When the gate fires but combo cannot help (no detector, or it finds no pill), the whole-image answer is
        kept: mode_used stays single, fallback_reason is null and `note` says what happened.

Each pill: K-code, drug name, confidence, the top-5 K-codes, the box, and the identifiers the AIHub labels carry
(EDI codes, item_seq, company, shape, colours, imprint; kept in the class map by the importer).

The detector is loaded on first use when inference.lazy_load_detector is true: single-mode requests never pay for
it. Hard cases (D-3: single with confidence < 0.30, or auto that fell back to combo) can be appended to a JSONL file.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.infer.preprocess import CropCountError, crop_detections
from pillsnap.infer.detection import Detector
from pillsnap.infer.hard_cases import HardCase, write_hard_cases
from pillsnap.core import layout
from pillsnap.core.identity import file_sha256
from pillsnap.infer.engines import (ClassifierEngine, InferenceSetupError, detector_engine, check_engine,
                                    detector_available, load_classifier_engine)
from pillsnap.infer.gating import Route, count_blobs, decide
from pillsnap.infer.preprocess import crop_pixels, load_rgb, normalise_batch, to_bgr

log = logging.getLogger(__name__)
MODES = ("single", "combo", "auto")
HARD_CASE_SINGLE_CONFIDENCE = 0.30  # D-3: a single-mode answer below this is kept for the weekly analysis
Pill = Dict[str, object]
Label = List[Tuple[str, float]]  # the top-5 (K-code, probability), best first


IDENTIFIERS = ("edi_codes", "item_seq", "company", "shape", "colours", "imprint")
TOP_K = 5


class Predictor:
    def __init__(self, classifier: ClassifierEngine, labels: ClassMap, image_size: int,
                 crop_padding: float, single_threshold: float, detector_loader: Optional[Callable[[], Detector]] = None,
                 lazy_detector: bool = True, default_mode: str = "auto", hard_cases: Optional[Path] = None,
                 batch_size: int = 32, identity: Optional[Dict[str, object]] = None):
        """labels: the classifier's label space (K-codes in output order, with their class info). `identity`
        (model_identity) is put into every answer, so an app can log which model identified a pill."""
        self.classifier, self.labels, self.identity = classifier, labels, identity
        self.k_codes = labels.k_codes
        self.image_size, self.crop_padding, self.threshold = image_size, crop_padding, single_threshold
        self.default_mode, self.hard_cases, self.batch_size = default_mode, hard_cases, batch_size
        self._detector_loader = detector_loader
        self._detector: Optional[Detector] = None
        if detector_loader is not None and not lazy_detector:
            self._detector = detector_loader()

    # ------------------------------------------------------------------ models
    @property
    def has_detector(self) -> bool:
        return self._detector is not None or self._detector_loader is not None

    @property
    def detector_loaded(self) -> bool:
        return self._detector is not None

    def detector(self) -> Detector:
        if self._detector is None:
            if self._detector_loader is None:
                raise InferenceSetupError("combo mode needs a detector, and this stage has none "
                                          "(no detector checkpoint / detector.onnx, or detection.enabled=false)")
            self._detector = self._detector_loader()
        return self._detector

    def classify_crops(self, crops: Sequence[np.ndarray]) -> List[Label]:
        """The top-5 (K-code, probability), best first, for each S×S×3 uint8 crop, in batches of `batch_size`."""
        out: List[Label] = []
        for start in range(0, len(crops), self.batch_size):
            probs = _softmax(self.classifier.logits(normalise_batch(crops[start:start + self.batch_size])))
            k = min(TOP_K, probs.shape[1])
            best = np.argsort(-probs, axis=1)[:, :k]
            out += [[(self.k_codes[int(i)], float(row[i])) for i in order] for order, row in zip(best, probs)]
        return out

    def classify_image(self, image: Image.Image) -> Label:
        return self.classify_crops([crop_pixels(image, None, self.image_size, 0.0)])[0]

    # ------------------------------------------------------------------ pipeline
    def predict(self, image: str | Path | Image.Image, mode: Optional[str] = None,
                name: Optional[str] = None) -> Dict[str, object]:
        """One photo (a path, or an image already decoded, e.g. from an upload); `name` labels it in the answer."""
        started = time.perf_counter()
        mode = mode or self.default_mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
        if mode == "combo" and not self.has_detector:
            self.detector()  # raises the clear "needs a detector" error before any work
        image_path = name if name is not None else str(image)
        if not isinstance(image, Image.Image):
            image = load_rgb(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        whole_box = [0.0, 0.0, float(image.width), float(image.height)]
        single = self.classify_image(image) if mode != "combo" else None
        detections, objects, source = None, None, None
        if mode == "auto":
            detections, objects, source = self._count_objects(image)
        route = decide(mode, single[0][1] if single else None, self.threshold, objects)
        result: Dict[str, object] = {
            "image": str(image_path), "mode_requested": mode, "mode_used": route.mode_used,
            "fallback_reason": route.reason, "gating_score": route.gating_score,
            "single_confidence": single[0][1] if single else None,
            "objects_hint": {"count": objects, "source": source} if mode == "auto" else None}
        if route.mode_used == "combo":
            self._combo(image, detections, route, result)
        if result["mode_used"] == "single":
            result["pills"] = [self._pill(single, whole_box)]
        result["latency_ms"] = (time.perf_counter() - started) * 1000
        if self.identity is not None:
            result["model"] = self.identity
        self._log_hard_case(result)
        return result

    def predict_many(self, image_paths: Sequence[str | Path], mode: Optional[str] = None) -> List[Dict[str, object]]:
        return [self.predict(p, mode) for p in image_paths]

    def _count_objects(self, image: Image.Image) -> Tuple[Optional[np.ndarray], int, str]:
        if self.has_detector:
            detections = self.detector()([to_bgr(image)])[0]
            return detections, int(len(detections)), "detector"
        return None, count_blobs(image), "image_heuristic"

    def _combo(self, image: Image.Image, detections: Optional[np.ndarray], route: Route,
               result: Dict[str, object]) -> None:
        if not self.has_detector:  # auto wanted combo but there is nothing to detect with
            result.update(mode_used="single", fallback_reason=None,
                          note=f"{route.reason}: combo unavailable (no detector); whole-image result kept")
            return
        if detections is None:
            detections = self.detector()([to_bgr(image)])[0]
        # One crop per detection, cut by the shared combination-evaluation rule, all classified in batches.
        crops = crop_detections(np.asarray(image), detections[:, :4], self.crop_padding, self.image_size)
        labels = self.classify_crops(list(crops))
        if len(labels) != len(detections):
            raise CropCountError(f"{len(detections)} detections but {len(labels)} classified crops in "
                                 f"{result['image']}")
        boxes = [[float(v) for v in det[:4]] for det in detections]
        if not boxes and result["mode_requested"] == "auto":
            result.update(mode_used="single", fallback_reason=None,
                          note=f"{route.reason}: the detector found no pill; whole-image result kept")
            return
        result["pills"] = [self._pill(label, box, float(det[4])) for label, box, det in zip(labels, boxes, detections)]

    def _pill(self, label: Label, box: Sequence[float], det_conf: Optional[float] = None) -> Pill:
        k_code, confidence = label[0]
        info = self.labels.info.get(k_code, {})
        pill: Pill = {"k_code": k_code, "drug_name": info.get("drug_name", ""), "confidence": confidence,
                      "top5": [{"k_code": k, "drug_name": self.labels.info.get(k, {}).get("drug_name", ""),
                                "confidence": c} for k, c in label],
                      "box": [round(float(v), 1) for v in box],
                      "identifiers": {key: info.get(key) for key in IDENTIFIERS}}
        if det_conf is not None:
            pill["detection_confidence"] = det_conf
        return pill

    def _log_hard_case(self, result: Dict[str, object]) -> None:
        if self.hard_cases is None:
            return
        conf = result["single_confidence"]
        low_single = result["mode_requested"] == "single" and conf is not None and conf < HARD_CASE_SINGLE_CONFIDENCE
        fell_back = result["mode_requested"] == "auto" and result["mode_used"] == "combo"
        if not (low_single or fell_back):
            return
        pills = result.get("pills") or []
        case = HardCase(image_path=str(result["image"]), true_kcode="",  # unknown at serving time
                        pred_kcode=str(pills[0]["k_code"]) if pills else "", mode_used=str(result["mode_used"]),
                        gating_score=result["gating_score"], single_confidence=conf,
                        fallback_reason=result["fallback_reason"],
                        extra={"mode_requested": result["mode_requested"], "pills": len(pills)})
        write_hard_cases(self.hard_cases, [case], append=True)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def model_identity(stage: int, engine: str, labels: ClassMap, files: Dict[str, Path]) -> Dict[str, object]:
    """Which model answers: the stage, the engine, each model file with its content hash, the class map's hash."""
    return {"stage": stage, "engine": engine, "class_map_hash": labels.hash,
            "files": {name: {"path": str(p), "sha256": file_sha256(p)} for name, p in files.items()}}


def load_predictor(cfg: PillSnapConfig, stage: Optional[int] = None, engine: Optional[str] = None,
                   hard_cases: Optional[Path] = None) -> Predictor:
    """The Predictor of a trained stage (default: the highest stage with a classifier best.pt)."""
    from pillsnap.data.prepare import class_map_path

    stage = stage if stage is not None else layout.latest_trained_stage(cfg.exp_dir)
    if stage is None:
        raise InferenceSetupError(f"no trained stage under {cfg.exp_dir} (no stage_<n>/checkpoints/best.pt)")
    engine = check_engine(engine or cfg.inference.engine)
    class_map = ClassMap.load(class_map_path(cfg))
    classifier, labels = load_classifier_engine(cfg, stage, engine, class_map)
    det_path = detector_available(cfg, stage, engine)
    loader = (lambda: detector_engine(cfg, det_path, engine)) if det_path is not None else None
    if loader is None:
        log.info("stage %d: no %s detector; combo mode unavailable, auto mode uses the image heuristic",
                 stage, engine)
    files = {"classifier": layout.classifier_checkpoint(cfg.exp_dir, stage) if engine == "torch" else
             layout.export_dir(cfg.exp_dir, stage) / layout.CLASSIFIER_ONNX}
    if det_path is not None:
        files["detector"] = det_path
    return Predictor(classifier, labels, cfg.classification.image_size,
                     cfg.classification.crop_padding, cfg.inference.single_confidence_threshold, loader,
                     cfg.inference.lazy_load_detector, cfg.inference.mode, hard_cases,
                     identity=model_identity(stage, engine, labels, files))
