"""Evaluate a stage's best classifier on the stage's validation split (never the test split).

Produces the measured results that Go/No-Go, the stage criteria and the advisor read, and the report files
(metrics, most-confused pairs, ROC/PR curves). The validation pass runs batched on evaluation.device (auto = the
training device); the latency the gates read is batch-1 end to end (decode, preprocess, model, top-k) through the
serving pipeline on inference.device, and is reported with that device's name.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd
import torch

from pillsnap.config import PillSnapConfig
from pillsnap.core.devices import device_name, select_device
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import pixel_store  # the training data's store: the same pixels, decoded once
from pillsnap.data.datasets import ClassificationDataset, Collate, classification_samples, finish_batch, make_loader
from pillsnap.evaluate.plots import save_confusion_report, save_roc_pr_report
from pillsnap.infer.engines import TorchClassifierEngine
from pillsnap.infer.latency import classifier_model_latency, pipeline_latency
from pillsnap.metrics.classification import classification_metrics
from pillsnap.models.classifier import load_classifier

log = logging.getLogger(__name__)
LATENCY_SAMPLES = 30


def _val_logits(cfg: PillSnapConfig, model: torch.nn.Module, labels: ClassMap, rows: pd.DataFrame,
                device: torch.device, batch_size: int):
    data = classification_samples(rows, labels, cfg.data.include_combination_crops, cfg.classification.crop_padding)
    size, pad = cfg.classification.image_size, cfg.classification.crop_padding
    store, store_rows = None, None
    if cfg.dataloader.cache.enabled:
        store = pixel_store(cfg)
        store_rows = store.ensure(data.samples, show_progress=False)
    dataset = ClassificationDataset(data, size, store, store_rows, pad)
    loader = make_loader(dataset, batch_size, cfg.dataloader, False, num_workers=0, collate=Collate())
    logits, y = [], []
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            images = finish_batch({"images": batch["images"].to(device, non_blocking=True)}, None)["images"]
            logits.append(model(images).float().cpu().numpy())
            y.append(batch["targets"].numpy())
    return data, np.concatenate(y), np.concatenate(logits)


def evaluate_classifier(cfg: PillSnapConfig, checkpoint: Path, subset: pd.DataFrame, class_map: ClassMap,
                        reports_dir: Path, batch_size: Optional[int] = None) -> Dict:
    device = select_device(cfg.evaluation.device, "evaluation.device")
    model, labels = load_classifier(cfg, checkpoint, class_map, device)
    val = subset[subset["split"] == "val"]
    data, y_true, logits = _val_logits(cfg, model, labels, val, device,
                                       batch_size or cfg.train.classification.batch_size)
    metrics = classification_metrics(y_true, logits, labels.k_codes)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    reports_dir = Path(reports_dir)
    save_confusion_report(y_true, logits.argmax(1), reports_dir, labels.k_codes, name="classification")
    if len(labels) > 1:
        save_roc_pr_report(y_true, probs, reports_dir, labels.k_codes, name="classification")
    serving = select_device(cfg.inference.device, "inference.device")
    photos: List[str] = [p for p, box in data.samples if box is None][:LATENCY_SAMPLES]
    engine = TorchClassifierEngine(model, serving)
    latency = pipeline_latency(cfg, engine, labels, photos)
    metrics.update({
        "inference_time_ms": classifier_model_latency(engine, cfg.classification.image_size)["p50"],
        "latency_p50_ms": latency.get("p50"), "latency_p95_ms": latency.get("p95"),
        "latency_device": device_name(serving), "latency_device_type": serving.type,
        "evaluation_device": device_name(device),
        "class_coverage": metrics["classes_evaluated"] / max(1, len(labels)),
        "num_classes": len(labels), "checkpoint": str(checkpoint),
    })
    write_json_atomic(reports_dir / "classification_eval.json", metrics)
    log.info("evaluation on %s: accuracy=%.4f macro_f1=%.4f top5=%.4f n=%d; batch-1 end-to-end p95 %.1f ms on %s",
             metrics["evaluation_device"], metrics["accuracy"], metrics["macro_f1"], metrics["top5"], metrics["n"],
             latency.get("p95", float("nan")), metrics["latency_device"])
    return metrics


def assemble_stage_results(evaluation: Dict, train: Dict, validation: Dict, detection: Dict | None = None,
                           export: Dict | None = None) -> Dict:
    """The one results dict that Go/No-Go (flat keys) and the criteria/advisor (nested keys) read.

    Nothing is filled in that was not measured: absent detector or export results stay absent.
    """
    counts = validation.get("counts", {})
    corrupt = sum(v for k, v in validation.get("findings", {}).items() if k in ("unreadable_image", "size_mismatch"))
    results = {
        "accuracy": evaluation.get("accuracy"),
        "n_eval_samples": evaluation.get("n"),
        "class_coverage": evaluation.get("class_coverage"),
        "latency_p95_ms": evaluation.get("latency_p95_ms"),
        "no_crashes": True,  # this function runs only after training finished without an unrecovered failure
        "memory_stable": not train.get("oom_events"),
        "loss": (train.get("val_metrics") or {}).get("val_loss"),  # the best epoch's validation loss
        "repeated_oom": len(train.get("oom_events") or []),
        "data_corruption_rate": corrupt / max(1, counts.get("images", 0)),
        "classification": {k: evaluation.get(k) for k in
                            ("accuracy", "macro_f1", "top5", "per_class_f1_min", "inference_time_ms")},
        "worst_classes": evaluation.get("worst_classes", []),
        "optimization": {"throughput_img_s": train.get("mean_throughput"), "batch_size_achieved": train.get("batch_size")},
        "advanced": {"class_imbalance_ratio": validation.get("imbalance_ratio")},
        "mandatory_checks": {
            "pipeline_complete": True,
            "classification_model_loading": evaluation.get("checkpoint") is not None,
            "detection_model_loading": bool(detection),
            "onnx_conversion_success": bool(export and export.get("ok")),
            "tensorboard_logging": bool(train.get("tensorboard")),
            "class_balance_verification": validation.get("imbalance_ratio") is not None,
        },
    }
    if detection:
        results["detection"] = detection
    return results
