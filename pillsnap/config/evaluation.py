"""The evaluation sections: the D-14 stage targets, the advisor's thresholds and the stage checks' bounds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from omegaconf import MISSING


@dataclass
class TargetSpec:
    """One stage target (D-14): the result at dotted key `metric` must be `op` (>= | <=) `value`."""

    metric: str = MISSING  # dotted key into the evaluation results, e.g. "detection.mAP_0.5"
    op: str = ">="
    value: float = MISSING


@dataclass
class StageCriteria:
    mandatory_checks: List[str] = field(default_factory=list)  # names in results["mandatory_checks"]
    targets: List[TargetSpec] = field(default_factory=list)  # scored (performance score)
    advanced: List[TargetSpec] = field(default_factory=list)  # reported, not scored


@dataclass
class RecommendationThresholds:
    # Spec D-14 advisor code: score >= 0.7 proceed, >= 0.5 optimize, else stop.
    # Set proceed_min_score: 1.0 for the stricter D-14 table ("proceed only when every target is met").
    proceed_min_score: float = 0.7
    optimize_min_score: float = 0.5


@dataclass
class AdvisorConfig:
    max_repeated_oom: int = 5  # more OOMs than this in one run is a critical failure
    max_data_corruption_rate: float = 0.01
    gpu_memory_high_gb: float = 14.0
    max_data_to_compute_ratio: float = 0.5  # data_time above this fraction of compute_time = input-bound
    max_data_loading_s: float = 3.0
    low_metric_fraction: float = 0.8  # a metric below this fraction of its target gets suggestions
    max_class_imbalance_ratio: float = 10.0
    worst_classes: int = 10


@dataclass
class ChecksConfig:
    """Bounds of the stage checks (pillsnap/evaluate/checks/registry.py; definitions in the README)."""
    max_host_memory_growth_mb: float = 1024.0  # private host memory, end of epoch 1 -> last epoch
    max_gpu_memory_growth_mb: float = 512.0  # the allocator's per-epoch peak, epoch 1 -> last epoch
    max_throughput_drop: float = 0.35  # late epochs' median throughput vs early epochs' (fraction lost)
    max_data_share: float = 0.5  # data time / (data + compute) of a training step, epochs after the first
    multi_batch_size: int = 32
    multi_batch_photos: int = 64
    # Top-1 flips between batch-N and batch-1 allowed, as a share of the photos: fp32 rounding can flip a photo
    # whose two best logits tie to the last bits; anything more is an engine whose answer depends on its batch.
    multi_batch_max_flip_rate: float = 0.02
    # class_coverage (Go/No-Go): the share of the stage's classes whose validation recall reaches this bound.
    min_class_recall: float = 0.5
    # What this pipeline cannot measure: a person confirms it in the review pause; unattended it is "unattested".
    attested: List[str] = field(default_factory=lambda: ["cloudflare_tunnel_setup"])


@dataclass
class EvaluationConfig:
    device: str = "auto"  # auto = the training device; evaluation, combination accuracy, final test, parity
    recommendation: RecommendationThresholds = field(default_factory=RecommendationThresholds)
    advisor: AdvisorConfig = field(default_factory=AdvisorConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    stages: Dict[int, StageCriteria] = field(default_factory=dict)  # D-14 tables, in the YAML
