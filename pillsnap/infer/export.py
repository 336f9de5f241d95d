"""ONNX export of a stage's classifier and detector, with a parity check against torch (D-2, D-6, D-14).

<stage_dir>/export/
  classifier.onnx      input `images` (B, 3, S, S) normalised RGB, output `logits` (B, K); K-codes in metadata
  detector.onnx        input `images` (B, 3, S, S) letterboxed RGB in [0, 1], output the RAW head (B, 5, N):
                       NMS stays outside the graph so torch and ONNX share pillsnap.infer.detection.nms_batch
  export_report.json   opset, shapes, parity numbers, pass/fail, file sizes, K-code hash

The classifier is exported even when the stage has no detector (the report says why the detector was not).
A failed parity check still writes the report, then raises ExportParityError with the numbers.
"""
from __future__ import annotations

import copy
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.core.devices import evaluation_device
from pillsnap.core.identity import file_sha256
from pillsnap.data.class_map import ClassMap
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.core import layout
from pillsnap.infer.engines import InferenceSetupError, TorchClassifierEngine
from pillsnap.infer.onnx_files import export_classifier_onnx, io_shapes, slim_in_place, write_metadata
from pillsnap.infer.parity import (check_classifier_parity, check_detector_parity, classifier_parity_images,
                                   detector_parity_rows)

log = logging.getLogger(__name__)


class ExportParityError(RuntimeError):
    """The ONNX model does not reproduce the torch model on validation images; the message has the numbers."""


def export_stage(cfg: PillSnapConfig, stage: int, subset: Optional[pd.DataFrame] = None,
                 class_map: Optional[ClassMap] = None, slim: bool = True) -> Dict:
    """Export the stage's best classifier (and detector, when there is one), check parity, write the report."""
    from pillsnap.data.prepare import class_map_path
    from pillsnap.data.subsets import read_subset
    from pillsnap.models.classifier import load_classifier

    class_map = class_map or ClassMap.load(class_map_path(cfg))
    subset = subset if subset is not None else read_subset(cfg.exp_dir, stage)[0]
    checkpoint = layout.classifier_checkpoint(cfg.exp_dir, stage)
    if not checkpoint.is_file():
        raise InferenceSetupError(f"export: no classifier checkpoint for stage {stage}: {checkpoint} does not exist")
    out = layout.export_dir(cfg.exp_dir, stage)
    model, labels = load_classifier(cfg, checkpoint, class_map)
    report: Dict = {"stage": stage, "opset": cfg.export.opset, "dynamic_batch": cfg.export.dynamic_batch,
                    "k_codes_hash": labels.hash, "num_classes": len(labels),
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "classifier": _export_classifier(cfg, model, labels, checkpoint, subset, out, slim),
                    "detector": _export_detector(cfg, stage, subset, out, slim)}
    failures = _failures(report)
    report.update(passed=not failures, ok=not failures, failures=failures)
    write_json_atomic(out / layout.EXPORT_REPORT, report)
    log.info("export stage %d -> %s: %s", stage, out, "PASS" if not failures else "FAIL " + "; ".join(failures))
    if failures:
        raise ExportParityError(f"ONNX export of stage {stage} failed its parity check ({out / layout.EXPORT_REPORT}"
                                f"): " + "; ".join(failures))
    return report


def _export_classifier(cfg: PillSnapConfig, model, labels: ClassMap, checkpoint: Path, subset: pd.DataFrame,
                       out: Path, slim: bool) -> Dict:
    size = cfg.classification.image_size
    path = export_classifier_onnx(model, out / layout.CLASSIFIER_ONNX, size, cfg.export.opset,
                                  cfg.export.dynamic_batch)
    slimmed = slim_in_place(path) if slim else "skipped: disabled"
    write_metadata(path, {"k_codes": labels.k_codes, "class_map_hash": labels.hash, "image_size": str(size),
                          "backbone": cfg.classification.backbone, "source_checkpoint": str(checkpoint)})
    images = classifier_parity_images(subset, cfg.export.parity_samples)
    device = evaluation_device(cfg)
    parity = check_classifier_parity(TorchClassifierEngine(copy.deepcopy(model), device), path, images, size,
                                     cfg.export.min_top1_agreement, device=device)
    return {"exported": True, "path": str(path), "onnxslim": slimmed, **_file_facts(path),
            "source_checkpoint": str(checkpoint), "source_sha256": file_sha256(checkpoint), "parity": parity.as_dict()}


def _export_detector(cfg: PillSnapConfig, stage: int, subset: pd.DataFrame, out: Path, slim: bool) -> Dict:
    checkpoint = layout.detector_checkpoint(cfg.exp_dir, stage)
    if not cfg.detection.enabled:
        return {"exported": False, "reason": "detection.enabled=false"}
    if not checkpoint.is_file():
        return {"exported": False, "reason": f"no detector checkpoint: {checkpoint} does not exist"}
    from pillsnap.models.activations import verify_onnx_activations
    from pillsnap.models.detector import export_detector_onnx, load_detector_checkpoint, parse_model_name
    from pillsnap.core.checkpoints import load_checkpoint

    payload = load_checkpoint(checkpoint)
    size = int(payload.get("image_size") or cfg.detection.image_size)
    if size != cfg.detection.image_size:
        log.warning("detector %s was trained at %d px, detection.image_size=%d: exporting at %d px",
                    checkpoint, size, cfg.detection.image_size, size)
    model = load_detector_checkpoint(checkpoint)
    path = export_detector_onnx(model, out / layout.DETECTOR_ONNX, size, cfg.export.opset, cfg.export.dynamic_batch)
    slimmed = slim_in_place(path) if slim else "skipped: disabled"
    activation = parse_model_name(str(payload["backbone"])).activation
    activations = verify_onnx_activations(path, activation).as_dict()  # raises when the graph lost the activation
    write_metadata(path, {"image_size": str(size), "backbone": str(payload["backbone"]),
                          "classes": payload.get("classes", ["pill"]), "source_checkpoint": str(checkpoint),
                          "nms": "outside the graph: pillsnap.infer.detection.nms_batch"})
    rows = detector_parity_rows(subset, cfg.export.parity_samples)
    parity = check_detector_parity(model, path, rows, size, cfg.export.max_map_diff, evaluation_device(cfg))
    return {"exported": True, "path": str(path), "onnxslim": slimmed, **_file_facts(path), "image_size": size,
            "backbone": payload["backbone"], "source_checkpoint": str(checkpoint),
            "source_sha256": file_sha256(checkpoint), "activations": activations,
            "parity": parity.as_dict()}


def _file_facts(path: Path) -> Dict:
    shapes = io_shapes(path)
    return {"input_shapes": shapes["inputs"], "output_shapes": shapes["outputs"], "size_bytes": path.stat().st_size,
            "sha256": file_sha256(path)}


def _failures(report: Dict) -> list:
    failures = []
    cp = report["classifier"]["parity"]
    if not cp["passed"]:
        failures.append(f"classifier: top-1 agreement {cp['top1_agreement']:.4f} < export.min_top1_agreement "
                        f"{cp['min_top1_agreement']} or non-finite output "
                        f"(max |Δlogit| {cp['max_abs_logit_diff']:.3g}, "
                        f"{cp['samples']} images)")
    det = report["detector"]
    if det.get("exported") and not det["parity"]["passed"]:
        dp = det["parity"]
        failures.append(f"detector: |mAP_0.5 torch {dp['map50_torch']:.4f} - onnx {dp['map50_onnx']:.4f}| = "
                        f"{dp['map50_diff']:.4f} > export.max_map_diff {dp['max_map_diff']} ({dp['samples']} images, "
                        f"max |Δraw| {dp['max_abs_raw_diff']:.3g})")
    return failures


def read_export_report(cfg: PillSnapConfig, stage: int) -> Dict:
    path = layout.export_dir(cfg.exp_dir, stage) / layout.EXPORT_REPORT
    if not path.is_file():
        raise FileNotFoundError(f"no export report: {path} (run `pillsnap export --stage {stage}`)")
    return json.loads(path.read_text())
