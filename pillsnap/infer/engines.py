"""Inference engines behind one interface, so predict, export parity, the final test and the benchmark share them.

A classifier engine maps a normalised (N, 3, S, S) float32 batch to (N, K) logits; torch and ONNX Runtime both.
The detector is `pillsnap.evaluate.detection.Detector` (letterbox -> raw head -> the ONE shared NMS), fed by a
torch model or an ONNX session: the two engines differ only in the raw predictor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Protocol, Tuple

import numpy as np
import torch

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap, check_same
from pillsnap.evaluate.detection import Detector, onnx_raw_predictor, torch_raw_predictor
from pillsnap.infer import locations
from pillsnap.infer.onnx_files import onnx_session, read_metadata

log = logging.getLogger(__name__)
ENGINES = ("torch", "onnx")


class InferenceSetupError(RuntimeError):
    """A model or export needed for inference is missing or does not match; the message names the file."""


class ClassifierEngine(Protocol):
    name: str

    def logits(self, batch: np.ndarray) -> np.ndarray: ...


class TorchClassifierEngine:
    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model.float().cpu().eval()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))).float().numpy()


class OnnxClassifierEngine:
    name = "onnx"

    def __init__(self, path: Path, threads: Optional[int] = None):
        self.path = Path(path)
        self.session = onnx_session(self.path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InferenceSetupError(f"inference.engine={engine!r} is not one of {list(ENGINES)}")
    return engine


def load_classifier_engine(cfg: PillSnapConfig, stage: int, engine: str,
                           class_map: ClassMap) -> Tuple[ClassifierEngine, ClassMap]:
    """The stage's classifier and its label space (K-codes in output order), checked against the class map."""
    if check_engine(engine) == "torch":
        from pillsnap.evaluate.stage_eval import load_classifier

        checkpoint = locations.classifier_checkpoint(cfg, stage)
        if not checkpoint.is_file():
            raise InferenceSetupError(f"no classifier checkpoint for stage {stage}: {checkpoint} does not exist")
        model, labels = load_classifier(cfg, checkpoint, class_map)
        return TorchClassifierEngine(model), labels
    path = locations.export_dir(cfg, stage) / locations.CLASSIFIER_ONNX
    if not path.is_file():
        raise InferenceSetupError(f"no ONNX classifier for stage {stage}: {path} does not exist "
                                  f"(run `pillsnap export --stage {stage}`)")
    return OnnxClassifierEngine(path), onnx_label_space(path, class_map)


def onnx_label_space(path: Path, class_map: ClassMap) -> ClassMap:
    meta = read_metadata(path)
    if "k_codes" not in meta:
        raise InferenceSetupError(f"{path}: no pillsnap.k_codes metadata; re-export it with `pillsnap export`")
    labels = class_map.restrict(json.loads(meta["k_codes"]))
    check_same(meta.get("class_map_hash", ""), labels, f"ONNX model {path}")
    return labels


def detector_available(cfg: PillSnapConfig, stage: int, engine: str) -> Optional[Path]:
    """The file the detector would load from, or None when the stage has none (or detection is disabled)."""
    if not cfg.detection.enabled:
        return None
    path = (locations.detector_checkpoint(cfg, stage) if engine == "torch"
            else locations.export_dir(cfg, stage) / locations.DETECTOR_ONNX)
    return path if path.is_file() else None


def build_detector(cfg: PillSnapConfig, path: Path, engine: str, batch_size: int = 8) -> Detector:
    """A serving Detector (detection.{conf,iou}_threshold, max_det) over a torch checkpoint or an ONNX file."""
    if check_engine(engine) == "torch":
        from pillsnap.models.detector import load_detector_checkpoint

        predict_raw = torch_raw_predictor(load_detector_checkpoint(path))
    else:
        exported = read_metadata(path).get("image_size")
        if exported is not None and int(exported) != cfg.detection.image_size:
            raise InferenceSetupError(f"{path} was exported at {exported} px but detection.image_size="
                                      f"{cfg.detection.image_size}; re-export or set detection.image_size={exported}")
        predict_raw = onnx_raw_predictor(path)
    det = cfg.detection
    log.info("detector loaded (%s engine) from %s", engine, path)
    return Detector(predict_raw, det.image_size, det.conf_threshold, det.iou_threshold, det.max_det, batch_size)
