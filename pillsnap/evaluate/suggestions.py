"""Concrete optimisation suggestions (D-14): each one names a config key and the value to try.

A `Suggestion` renders as a CLI dotlist override (`key=value`), so "apply the suggestions and rerun" is
`pillsnap ... <overrides>`. Values are computed from the current config, never absolute guesses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from pillsnap.config import PillSnapConfig
from pillsnap.evaluate.criteria import CriteriaReport
from pillsnap.evaluate.results import StageResults


@dataclass(frozen=True)
class Suggestion:
    key: str  # dotted config key, e.g. "dataloader.num_workers"
    value: Any
    why: str

    def as_override(self) -> str:
        return f"{self.key}={format_override_value(self.value)}"

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "value": self.value, "why": self.why, "override": self.as_override()}


def format_override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _round(value: float) -> float:
    return float(f"{value:.6g}")  # 0.001 * 0.5 prints as 0.0005, not 0.00049999


def _next_worker_count(cfg: PillSnapConfig) -> int:
    current = cfg.dataloader.num_workers
    larger = sorted(c for c in cfg.dataloader.autotune_candidates if c > current)
    return larger[0] if larger else current + 4


def memory_suggestions(cfg: PillSnapConfig, results: StageResults, why: str = "") -> List[Suggestion]:
    """Halve the classifier batch and double accumulation, so the effective batch stays the same."""
    if not why:
        gpu_gb = results.training.gpu_memory_gb
        limit = cfg.evaluation.advisor.gpu_memory_high_gb
        if gpu_gb is None or gpu_gb <= limit:
            return []
        why = f"GPU memory {gpu_gb:.1f} GB > {limit} GB"
    batch = cfg.train.classification.batch_size
    out = []
    if batch > 1:
        out.append(Suggestion("train.classification.batch_size", max(1, batch // 2), why))
    out.append(Suggestion("train.grad_accum_steps", cfg.train.grad_accum_steps * 2, f"{why}; keeps the effective batch"))
    return out


def input_pipeline_suggestions(cfg: PillSnapConfig, results: StageResults) -> List[Suggestion]:
    limits = cfg.evaluation.advisor
    data_t, comp_t = results.training.data_time_s, results.training.compute_time_s
    reasons = []
    if data_t is not None and comp_t is not None and data_t > limits.max_data_to_compute_ratio * comp_t:
        reasons.append(f"data_time {data_t:.3f}s > {limits.max_data_to_compute_ratio}×compute_time ({comp_t:.3f}s)")
    if data_t is not None and data_t > limits.max_data_loading_s:
        reasons.append(f"data loading {data_t:.2f}s > {limits.max_data_loading_s}s")
    if not reasons:
        return []
    why = "; ".join(reasons)
    out = [Suggestion("dataloader.num_workers", _next_worker_count(cfg), why)]
    if not cfg.dataloader.cache.enabled:
        out.append(Suggestion("dataloader.cache.enabled", True, f"{why}; decode once into the preprocessing cache"))
    return out


def _below_fraction_of_target(report: Optional[CriteriaReport], metric: str, fraction: float) -> Optional[str]:
    row = report.target(metric) if report else None
    if row is None or row.measured is None or row.op != ">=":
        return None
    if row.measured < fraction * row.target or math.isnan(row.measured):
        return f"{metric} {row.measured:.3f} < {fraction}×target {row.target}"
    return None


def detection_suggestions(cfg: PillSnapConfig, report: Optional[CriteriaReport]) -> List[Suggestion]:
    why = _below_fraction_of_target(report, "detection.mAP_0.5", cfg.evaluation.advisor.low_metric_fraction)
    if why is None or not cfg.detection.enabled:
        return []
    epochs = cfg.train.detection.epochs
    return [Suggestion("train.detection.epochs", math.ceil(epochs * 1.5), f"{why}; train the detector longer")]


def classification_suggestions(cfg: PillSnapConfig, report: Optional[CriteriaReport]) -> List[Suggestion]:
    why = _below_fraction_of_target(report, "classification.accuracy", cfg.evaluation.advisor.low_metric_fraction)
    if why is None:
        return []
    out = []
    if cfg.loss.label_smoothing < 0.2:
        out.append(Suggestion("loss.label_smoothing", _round(min(0.2, cfg.loss.label_smoothing + 0.05)),
                              f"{why}; stronger regularisation"))
    if cfg.classification.drop_rate < 0.5:
        out.append(Suggestion("classification.drop_rate", _round(min(0.5, cfg.classification.drop_rate + 0.1)),
                              f"{why}; stronger regularisation"))
    if not cfg.loss.weighted_sampler:
        out.append(Suggestion("loss.weighted_sampler", True, f"{why}; rare classes are seen as often as common ones"))
    return out


def imbalance_suggestions(cfg: PillSnapConfig, results: StageResults) -> List[Suggestion]:
    ratio = results.data.class_imbalance_ratio
    limit = cfg.evaluation.advisor.max_class_imbalance_ratio
    if ratio is None or ratio <= limit:
        return []
    why = f"class imbalance ratio {ratio:.1f}:1 > {limit}:1"
    if not cfg.loss.use_class_weights:
        return [Suggestion("loss.use_class_weights", True, why)]
    if cfg.loss.class_weight_mode == "inverse_frequency":
        return [Suggestion("loss.class_weight_mode", "effective_number", f"{why} with inverse-frequency weights")]
    return []


def nan_loss_suggestions(cfg: PillSnapConfig) -> List[Suggestion]:
    why = "loss became NaN/inf (divergence)"
    out = [
        Suggestion("train.classification.lr", _round(cfg.train.classification.lr * 0.5), why),
        Suggestion("train.detection.lr", _round(cfg.train.detection.lr * 0.5), why),
    ]
    if cfg.optimization.amp and cfg.optimization.amp_dtype == "fp16":
        out.append(Suggestion("optimization.amp_dtype", "bf16", f"{why}; fp16 overflows where bf16 does not"))
    return out


def diagnose(cfg: PillSnapConfig, results: StageResults, report: Optional[CriteriaReport]) -> List[Suggestion]:
    """Every suggestion the measured results support, one per config key (first reason wins)."""
    found = [
        *memory_suggestions(cfg, results),
        *input_pipeline_suggestions(cfg, results),
        *detection_suggestions(cfg, report),
        *classification_suggestions(cfg, report),
        *imbalance_suggestions(cfg, results),
    ]
    return dedupe(found)


def dedupe(suggestions: List[Suggestion]) -> List[Suggestion]:
    seen: Dict[str, Suggestion] = {}
    for s in suggestions:
        seen.setdefault(s.key, s)
    return list(seen.values())


def worst_classes(results: StageResults, n: int) -> List[Dict[str, Any]]:
    """The n classes with the lowest F1 (as `metrics.classification_metrics` lists them)."""
    rows = [{"class": str(r["class"]), "f1": float(r["f1"])} for r in results.classifier.worst_classes]
    return sorted(rows, key=lambda r: (r["f1"], r["class"]))[:n]
