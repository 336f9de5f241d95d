"""Inference engines behind one interface, so predict, export parity, the final test and the benchmark share them.

A classifier engine maps a normalised (N, 3, S, S) float32 batch to (N, K) logits; torch and ONNX Runtime both.
The detector is `pillsnap.infer.detection.Detector` (letterbox -> raw head -> the ONE shared NMS), fed by a
torch model or an ONNX session: the two engines differ only in the raw predictor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional, Protocol, Tuple

import numpy as np
import torch

from pillsnap.config import PillSnapConfig
from pillsnap.core.devices import device_name, serving_device
from pillsnap.data.class_map import ClassMap, check_same
from pillsnap.infer.detection import Detector, onnx_raw_predictor, torch_raw_predictor
from pillsnap.core import layout
from pillsnap.infer.onnx_files import onnx_session, read_metadata

log = logging.getLogger(__name__)
ENGINES = ("torch", "onnx")


class InferenceSetupError(RuntimeError):
    """A model or export needed for inference is missing or does not match; the message names the file."""


class ClassifierEngine(Protocol):
    name: str
    runs_on: str  # where its figures are made, as reports print it

    def logits(self, batch: np.ndarray) -> np.ndarray: ...


class TorchClassifierEngine:
    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.float().to(self.device).eval()

    @property
    def runs_on(self) -> str:
        """Where its figures are made."""
        return device_name(self.device)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
        with torch.no_grad():
            return self.model(x).float().cpu().numpy()


class OnnxClassifierEngine:
    name = "onnx"

    def __init__(self, path: Path, threads: Optional[int] = None, device: str | torch.device = "cpu"):
        self.path, self.device = Path(path), torch.device(device)
        self.session = onnx_session(self.path, providers=onnx_providers(self.device), threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def runs_on(self) -> str:
        """Where its figures are made: the session's first provider, not the device asked for (a CPU build of
        onnxruntime runs on the CPU of a GPU machine)."""
        return onnx_runs_on(self.session.get_providers(), self.device)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise InferenceSetupError(f"inference.engine={engine!r} is not one of {list(ENGINES)}")
    return engine


def onnx_runs_on(providers: List[str], device: torch.device) -> str:
    if providers and providers[0] == "CUDAExecutionProvider":
        return f"{device_name(device)} (onnxruntime CUDA)"
    missing = ("; this onnxruntime has no CUDA provider: install onnxruntime-gpu to serve ONNX on the GPU"
               if device.type == "cuda" else "")
    return f"{device_name(torch.device('cpu'))} (onnxruntime CPU{missing})"


def onnx_providers(device: torch.device) -> List[str]:
    """CUDA first when the device is a GPU and this ONNX Runtime build has it; the CPU always."""
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


def load_classifier_engine(cfg: PillSnapConfig, stage: int, engine: str, class_map: ClassMap,
                           device: Optional[torch.device] = None) -> Tuple[ClassifierEngine, ClassMap]:
    """The stage's classifier and its label space (K-codes in output order), checked against the class map."""
    device = device or serving_device(cfg)
    if check_engine(engine) == "torch":
        from pillsnap.models.classifier import load_classifier

        checkpoint = layout.classifier_checkpoint(cfg.exp_dir, stage)
        if not checkpoint.is_file():
            raise InferenceSetupError(f"no classifier checkpoint for stage {stage}: {checkpoint} does not exist")
        model, labels = load_classifier(cfg, checkpoint, class_map, device)
        return TorchClassifierEngine(model, device), labels
    path = layout.export_dir(cfg.exp_dir, stage) / layout.CLASSIFIER_ONNX
    if not path.is_file():
        raise InferenceSetupError(f"no ONNX classifier for stage {stage}: {path} does not exist "
                                  f"(run `pillsnap export --stage {stage}`)")
    return OnnxClassifierEngine(path, device=device), onnx_label_space(path, class_map)


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
    path = (layout.detector_checkpoint(cfg.exp_dir, stage) if engine == "torch"
            else layout.export_dir(cfg.exp_dir, stage) / layout.DETECTOR_ONNX)
    return path if path.is_file() else None


def detector_engine(cfg: PillSnapConfig, path: Path, engine: str, batch_size: int = 8,
                   device: Optional[torch.device] = None) -> Detector:
    """A serving Detector (detection.{conf,iou}_threshold, max_det) over a torch checkpoint or an ONNX file."""
    device = device or serving_device(cfg)
    if check_engine(engine) == "torch":
        from pillsnap.models.detector import load_detector_checkpoint

        predict_raw = torch_raw_predictor(load_detector_checkpoint(path, device), on_device=True)  # NMS there too
    else:
        exported = read_metadata(path).get("image_size")
        if exported is not None and int(exported) != cfg.detection.image_size:
            raise InferenceSetupError(f"{path} was exported at {exported} px but detection.image_size="
                                      f"{cfg.detection.image_size}; re-export or set detection.image_size={exported}")
        predict_raw = onnx_raw_predictor(path, onnx_providers(device))
    det = cfg.detection
    log.info("detector loaded (%s engine, %s) from %s", engine, device, path)
    return Detector(predict_raw, det.image_size, det.conf_threshold, det.iou_threshold, det.max_det, batch_size)
