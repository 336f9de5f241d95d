"""Evaluate a stage's best classifier on the stage's validation split (never the test split).

Produces the measured results that Go/No-Go, the stage criteria and the advisor read, and the report files
(metrics, most-confused pairs, ROC/PR curves).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pandas as pd
import torch

from pillsnap.config import PillSnapConfig
from pillsnap.data.cache import build_cache
from pillsnap.data.class_map import ClassMap
from pillsnap.data.datasets import ClassificationDataset, classification_samples, make_loader
from pillsnap.evaluate.metrics import classification_metrics
from pillsnap.evaluate.plots import save_confusion_report, save_roc_pr_report
from pillsnap.evaluate.reports import write_json_atomic
from pillsnap.models.classifier import build_classifier
from pillsnap.train.checkpoints import check_compatible, load_checkpoint

log = logging.getLogger(__name__)
LATENCY_SAMPLES = 30


def load_classifier(cfg: PillSnapConfig, checkpoint: Path, class_map: ClassMap) -> Tuple[torch.nn.Module, ClassMap]:
    """The classifier of a checkpoint and its label space, checked against the global class map."""
    payload = load_checkpoint(checkpoint)
    labels = class_map.restrict(payload["k_codes"])
    check_compatible(payload, cfg.classification.backbone, len(labels), labels.hash, checkpoint)
    model = build_classifier(cfg.classification, len(labels))
    model.load_state_dict(payload["model"])
    return model.eval(), labels


def _val_logits(cfg: PillSnapConfig, model: torch.nn.Module, labels: ClassMap, rows: pd.DataFrame):
    data = classification_samples(rows, labels, cfg.data.include_combination_crops)
    size, pad = cfg.classification.image_size, cfg.classification.crop_padding
    cache = None
    if cfg.dataloader.cache.enabled:
        cache = build_cache(data.samples, size, Path(cfg.dataloader.cache.dir or cfg.exp_dir / "data" / "cache"),
                            pad, show_progress=False)
    dataset = ClassificationDataset(data, size, False, cache, pad)
    loader = make_loader(dataset, cfg.train.classification.batch_size, cfg.dataloader, False, num_workers=0)
    logits, y = [], []
    with torch.no_grad():
        for batch in loader:
            if batch is not None:
                logits.append(model(batch[0]).float().numpy())
                y.append(batch[1].numpy())
    return dataset, np.concatenate(y), np.concatenate(logits)


def _latency_ms(model: torch.nn.Module, dataset: ClassificationDataset) -> Dict[str, float]:
    """Single-image latency (batch 1, this machine) after a warm-up, as p50/p95 in ms."""
    times = []
    with torch.no_grad():
        for i in range(min(len(dataset), LATENCY_SAMPLES + 5)):
            item = dataset[i]
            if item is None:
                continue
            x = item[0].unsqueeze(0)
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1000)
    times = times[5:] or times
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))} if times else {}


def evaluate_classifier(cfg: PillSnapConfig, checkpoint: Path, subset: pd.DataFrame, class_map: ClassMap,
                        reports_dir: Path) -> Dict:
    model, labels = load_classifier(cfg, checkpoint, class_map)
    dataset, y_true, logits = _val_logits(cfg, model, labels, subset[subset["split"] == "val"])
    metrics = classification_metrics(y_true, logits, labels.k_codes)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    reports_dir = Path(reports_dir)
    save_confusion_report(y_true, logits.argmax(1), reports_dir, labels.k_codes, name="classification")
    if len(labels) > 1:
        save_roc_pr_report(y_true, probs, reports_dir, labels.k_codes, name="classification")
    latency = _latency_ms(model, dataset)
    metrics.update({
        "inference_time_ms": latency.get("p50"), "latency_p95_ms": latency.get("p95"),
        "class_coverage": metrics["classes_evaluated"] / max(1, len(labels)),
        "num_classes": len(labels), "checkpoint": str(checkpoint),
    })
    write_json_atomic(reports_dir / "classification_eval.json", metrics)
    log.info("evaluation: accuracy=%.4f macro_f1=%.4f top5=%.4f n=%d p95=%.1fms", metrics["accuracy"],
             metrics["macro_f1"], metrics["top5"], metrics["n"], latency.get("p95", float("nan")))
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
