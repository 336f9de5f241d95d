"""Evaluate a stage's best classifier on the stage's validation split (never the test split).

Produces the classifier's measured results (pillsnap.evaluate.results builds the stage's typed results from them)
and the report files (metrics, most-confused pairs, ROC/PR curves). The validation pass runs batched on evaluation.device (auto = the
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
from pillsnap.core.identity import file_sha256
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.data.class_map import ClassMap
from pillsnap.data.prepare import pixel_store  # the training data's store: the same pixels, decoded once
from pillsnap.data.datasets import ClassificationDataset, Collate, classification_samples, finish_batch, make_loader
from pillsnap.data.subsets import val_rows_hash
from pillsnap.evaluate.batch_consistency import batch_consistency
from pillsnap.evaluate.plots import save_confusion_report, save_roc_pr_report
from pillsnap.infer.engines import TorchClassifierEngine
from pillsnap.infer.latency import classifier_model_latency, pipeline_latency
from pillsnap.metrics.classification import class_coverage, classification_metrics
from pillsnap.models.classifier import load_classifier

log = logging.getLogger(__name__)
LATENCY_SAMPLES = 30


def _val_logits(cfg: PillSnapConfig, model: torch.nn.Module, labels: ClassMap, rows: pd.DataFrame,
                device: torch.device, batch_size: int):
    data = classification_samples(rows, labels, cfg.data.include_combination_crops, cfg.classification.crop_padding)
    size, pad = cfg.classification.image_size, cfg.classification.crop_padding
    store, store_rows = None, None
    if cfg.dataloader.cache.enabled:
        store = pixel_store(cfg, len(data.samples))
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
                        reports_dir: Path, batch_size: Optional[int] = None,
                        previous_subset: Optional[pd.DataFrame] = None) -> Dict:
    """`previous_subset`: the previous stage's subset, for the regression guard (this model on its val photos)."""
    device = select_device(cfg.evaluation.device, "evaluation.device")
    model, labels = load_classifier(cfg, checkpoint, class_map, device)
    val = subset[subset["split"] == "val"]
    batch_size = batch_size or cfg.train.classification.batch_size
    data, y_true, logits = _val_logits(cfg, model, labels, val, device, batch_size)
    metrics = classification_metrics(y_true, logits, labels.k_codes)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    reports_dir = Path(reports_dir)
    confusion = save_confusion_report(y_true, logits.argmax(1), reports_dir, labels.k_codes, name="classification")
    pictures = {"confusion matrix": confusion["png"]}
    if len(labels) > 1:
        curves = save_roc_pr_report(y_true, probs, reports_dir, labels.k_codes, name="classification")
        pictures.update({"ROC": curves.get("roc_png"), "precision-recall": curves.get("pr_png")})
    photos: List[str] = [p for p, box in data.samples if box is None]
    checks = cfg.evaluation.checks
    multi_batch = batch_consistency(TorchClassifierEngine(model, device), photos[:checks.multi_batch_photos],
                                    cfg.classification.image_size, checks.multi_batch_size) if photos else None
    serving = select_device(cfg.inference.device, "inference.device")
    photos = photos[:LATENCY_SAMPLES]
    engine = TorchClassifierEngine(model, serving)
    latency = pipeline_latency(cfg, engine, labels, photos)
    metrics.update({
        "inference_time_ms": classifier_model_latency(engine, cfg.classification.image_size)["p50"],
        "latency_p50_ms": latency.get("p50"), "latency_p95_ms": latency.get("p95"),
        "latency_device": device_name(serving), "latency_device_type": serving.type,
        "evaluation_device": device_name(device),
        **class_coverage(y_true, logits.argmax(1), len(labels), cfg.evaluation.checks.min_class_recall),
        "num_classes": len(labels), "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
        "val_hash": val_rows_hash(subset), "multi_batch": multi_batch,
        "logits_finite": bool(np.isfinite(logits).all()),
        "previous_stage_val": None if previous_subset is None else
        _on_previous_val(cfg, model, labels, previous_subset, device, batch_size),
        "pictures": {k: v for k, v in pictures.items() if v},
    })
    write_json_atomic(reports_dir / "classification_eval.json", metrics)
    log.info("evaluation on %s: accuracy=%.4f macro_f1=%.4f top5=%.4f n=%d; batch-1 end-to-end p95 %.1f ms on %s",
             metrics["evaluation_device"], metrics["accuracy"], metrics["macro_f1"], metrics["top5"], metrics["n"],
             latency.get("p95", float("nan")), metrics["latency_device"])
    return metrics


def _on_previous_val(cfg: PillSnapConfig, model: torch.nn.Module, labels: ClassMap, previous: pd.DataFrame,
                     device: torch.device, batch_size: int) -> Dict:
    """D-12's regression guard compares like with like: this stage's model on the previous stage's validation
    photos (the photos the previous model's accuracy was measured on)."""
    val = previous[(previous["split"] == "val") & previous["k_code"].isin(set(labels.k_codes))]
    if val.empty:
        return {"photos": 0, "accuracy": None, "val_hash": val_rows_hash(previous)}
    _, y_true, logits = _val_logits(cfg, model, labels, val, device, batch_size)
    return {"photos": int(len(y_true)), "accuracy": float((logits.argmax(1) == y_true).mean()),
            "val_hash": val_rows_hash(previous)}
