"""A stage's results: ONE typed object, built once (`stage_results`), read by Go/No-Go, the criteria, the advisor,
the report and the ledger. Tasks exchange it as a dict (to_dict / from_dict) and nothing else reads that dict.

Every figure was measured in this run or is None ("not measured"); nothing is filled in by default. The names the
configuration's targets use ("detection.mAP_0.5", "production.inference_latency_ms", …) are the keys of METRICS,
each the path of a typed field: a target naming anything else is a configuration error, not a silent gap.

One status vocabulary for every verdict (stage checks, Go/No-Go rows, mandatory checks, targets): Status.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Dict, List, Mapping, Optional, Tuple


class Status(str, Enum):
    PASS = "pass"  # measured, within its bound (a target: met)
    FAIL = "fail"  # measured, outside its bound (or a person said no to an attested check)
    NOT_MEASURED = "not_measured"  # nothing to measure it from: it blocks like a failure
    NOT_APPLICABLE = "not_applicable"  # the configuration rules it out: neither passes nor blocks
    SKIPPED = "skipped"  # a Go/No-Go row with a recorded reason not to apply (Stage 1's regression guard)
    ATTESTED = "attested"  # a check this pipeline cannot see, confirmed by a named person
    UNATTESTED = "unattested"  # such a check nobody named confirmed: it blocks like a failure

    @property
    def passes(self) -> bool:
        return self in (Status.PASS, Status.ATTESTED)

    @property
    def blocks(self) -> bool:
        return self in (Status.FAIL, Status.NOT_MEASURED, Status.UNATTESTED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ClassifierResults:
    """The stage's best classifier on its validation photos (evaluate_classifier)."""
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    top5: Optional[float] = None
    per_class_f1_min: Optional[float] = None
    per_class_min_top1: Optional[float] = None
    inference_time_ms: Optional[float] = None  # the model alone, batch 1, p50
    latency_p95_ms: Optional[float] = None  # the single-photo pipeline, batch 1, end to end, p95 (Go/No-Go)
    n: Optional[int] = None  # validation photos evaluated
    class_coverage: Optional[float] = None  # share of classes whose validation recall reaches the bound
    previous_stage_accuracy: Optional[float] = None  # this model on the previous stage's validation photos
    previous_stage_photos: Optional[int] = None  # how many of them (the regression guard compares like with like)
    previous_stage_val_hash: Optional[str] = None  # and which: the row hash of that stage's validation photos
    multi_batch_size: Optional[int] = None  # the batch size whose top-1 matched batch 1 (when that check passed)
    worst_classes: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class DetectorResults:
    """The stage's best detector on the validation combination photos (single photos are reported apart)."""
    map50: Optional[float] = None
    map50_95: Optional[float] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    inference_time_ms: Optional[float] = None  # the model alone, batch 1, p50


@dataclass(frozen=True)
class ApiResults:
    """The stage's API check (`pillsnap serve` on the exports)."""
    p95_ms: Optional[float] = None
    throughput_img_s: Optional[float] = None
    success_pct: Optional[float] = None  # planned requests answered (what a stage's check can show; not uptime)
    device: Optional[str] = None  # what made the figures (an ONNX session's provider), else the serving device


@dataclass(frozen=True)
class TrainingResults:
    """What the training run showed, over every model and epoch."""
    throughput_img_s: Optional[float] = None  # the classifier's mean img/s
    batch_size_achieved: Optional[int] = None  # the classifier's batch, when a probed plan chose it
    gpu_memory_gb: Optional[float] = None  # the GPU allocator's peak (None on a CPU)
    data_time_s: Optional[float] = None  # the classifier's mean data / compute time per step
    compute_time_s: Optional[float] = None
    repeated_oom: int = 0  # OOM recoveries over every model
    loss: Optional[float] = None  # the classifier's best epoch's validation loss
    loss_variance: Optional[float] = None  # variance of the classifier's later-half training losses
    memory_peak_to_avg: Optional[float] = None  # the training device's memory: peak / mean over the epochs
    memory_stable_hours: Optional[float] = None  # hours trained with memory in bounds (0 when the leak test failed)
    world_size: int = 1  # training processes
    per_rank_throughput_img_s: Optional[float] = None  # the classifier's img/s per process (throughput / world size)
    host_memory_peak_mb: Optional[float] = None  # the largest process's private host memory at an epoch end


@dataclass(frozen=True)
class DataResults:
    corruption_rate: Optional[float] = None  # unreadable or mis-sized photos / photos (validation report)
    class_imbalance_ratio: Optional[float] = None  # the stage's most / fewest training photos per class
    lost_classes: Optional[int] = None  # classes of the release with no usable training photo (validation)


@dataclass(frozen=True)
class StageResults:
    stage: int
    classifier: ClassifierResults = field(default_factory=ClassifierResults)
    detector: Optional[DetectorResults] = None  # None: no detector trained (detection.enabled=false)
    api: Optional[ApiResults] = None  # None: no API check ran
    training: TrainingResults = field(default_factory=TrainingResults)
    data: DataResults = field(default_factory=DataResults)
    checks: Dict[str, Status] = field(default_factory=dict)  # every stage check's status (checks.json)
    # The whole pipeline, batch 1, p95 on the serving device: auto mode (the detector and every crop) with a
    # detector, single mode without one.
    pipeline_latency_p95_ms: Optional[float] = None

    def check(self, name: str) -> Status:
        return self.checks.get(name, Status.NOT_MEASURED)

    def metric(self, name: str) -> Optional[float]:
        """The measurement a target names (see METRICS); None when it was not measured."""
        if name not in METRICS:
            raise KeyError(f"no measurement named {name!r}; the measurements are {sorted(METRICS)}")
        value: Any = self
        for attribute in METRICS[name]:
            value = getattr(value, attribute) if value is not None else None
        return None if value is None else float(value)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["checks"] = {k: Status(v).value for k, v in self.checks.items()}
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "StageResults":
        """From to_dict's form (the task boundary); a value of the wrong kind is an error naming its field."""
        def part(kind, value):
            return None if value is None else kind(**_checked(kind, value))

        return cls(stage=int(doc["stage"]), classifier=part(ClassifierResults, doc["classifier"]),
                   detector=part(DetectorResults, doc.get("detector")), api=part(ApiResults, doc.get("api")),
                   training=part(TrainingResults, doc["training"]), data=part(DataResults, doc["data"]),
                   checks={k: Status(v) for k, v in (doc.get("checks") or {}).items()},
                   pipeline_latency_p95_ms=_number("pipeline_latency_p95_ms", doc.get("pipeline_latency_p95_ms")))


# The names stage targets use (evaluation.stages.N.targets / advanced): each the attribute path of a measurement.
METRICS: Dict[str, Tuple[str, ...]] = {
    "classification.accuracy": ("classifier", "accuracy"),
    "classification.macro_f1": ("classifier", "macro_f1"),
    "classification.top5": ("classifier", "top5"),
    "classification.per_class_f1_min": ("classifier", "per_class_f1_min"),
    "classification.per_class_min_top1": ("classifier", "per_class_min_top1"),
    "classification.inference_time_ms": ("classifier", "inference_time_ms"),
    "detection.mAP_0.5": ("detector", "map50"),
    "detection.mAP_0.5_0.95": ("detector", "map50_95"),
    "detection.precision": ("detector", "precision"),
    "detection.recall": ("detector", "recall"),
    "detection.inference_time_ms": ("detector", "inference_time_ms"),
    "system.gpu_memory_gb": ("training", "gpu_memory_gb"),
    "system.data_loading_s": ("training", "data_time_s"),  # the time a step waits for its batch
    "system.data_time_s": ("training", "data_time_s"),
    "system.compute_time_s": ("training", "compute_time_s"),
    "optimization.throughput_img_s": ("training", "throughput_img_s"),
    "optimization.batch_size_achieved": ("training", "batch_size_achieved"),
    "scalability.multi_batch_size": ("classifier", "multi_batch_size"),
    "scalability.api_response_time_ms": ("api", "p95_ms"),
    "scalability.memory_stable_hours": ("training", "memory_stable_hours"),
    "production.inference_latency_ms": ("pipeline_latency_p95_ms",),
    "production.throughput_img_s": ("api", "throughput_img_s"),
    "production.api_success_pct": ("api", "success_pct"),
    "advanced.class_imbalance_ratio": ("data", "class_imbalance_ratio"),
    "advanced.loss_variance": ("training", "loss_variance"),
    "advanced.memory_peak_to_avg": ("training", "memory_peak_to_avg"),
}


def decision_metrics(results: StageResults) -> Dict[str, Any]:
    """The figures a decision's ledger entry keeps: the classifier's, the training's scale (processes, throughput
    in all and per process, the largest process's memory), and the detector's on the validation combination photos
    (the final test's val-vs-test gap reads both)."""
    c, d, t = results.classifier, results.detector, results.training
    out: Dict[str, Any] = {"accuracy": c.accuracy, "macro_f1": c.macro_f1, "top5": c.top5, "n": c.n,
                           "world_size": t.world_size, "throughput_img_s": t.throughput_img_s,
                           "per_rank_throughput_img_s": t.per_rank_throughput_img_s,
                           "host_memory_peak_mb": t.host_memory_peak_mb, "gpu_memory_gb": t.gpu_memory_gb}
    if d is not None:
        out.update({"mAP_0.5": d.map50, "mAP_0.5_0.95": d.map50_95, "precision": d.precision, "recall": d.recall})
    return out


# ------------------------------------------------------------------------------------------------- building it
def stage_results(stage: int, evaluation: Mapping[str, Any], trained: Mapping[str, Mapping[str, Any]],
                  validation: Mapping[str, Any], subset: Mapping[str, Any], checks: Mapping[str, str],
                  detection: Optional[Mapping[str, Any]] = None,
                  api: Optional[Mapping[str, Any]] = None) -> StageResults:
    """From what the stage's tasks returned: the classifier's evaluation, {model: TrainResult dict}, the data
    validation report, the subset summary, {check: status}, the detector's results (detection_results) and the
    API check."""
    statuses = {name: Status(value) for name, value in checks.items()}
    multi = evaluation.get("multi_batch") or {}
    classifier = ClassifierResults(
        **{k: evaluation.get(k) for k in ("accuracy", "macro_f1", "top5", "per_class_f1_min", "per_class_min_top1",
                                          "inference_time_ms", "latency_p95_ms", "n", "class_coverage")},
        previous_stage_accuracy=(evaluation.get("previous_stage_val") or {}).get("accuracy"),
        previous_stage_photos=(evaluation.get("previous_stage_val") or {}).get("photos"),
        previous_stage_val_hash=(evaluation.get("previous_stage_val") or {}).get("val_hash"),
        multi_batch_size=multi.get("batch_size") if statuses.get("multi_batch_processing") == Status.PASS else None,
        worst_classes=list(evaluation.get("worst_classes") or []))
    pipeline = ((detection or {}).get("combination") or {}).get("pipeline_latency") or {}
    return StageResults(stage=stage, classifier=classifier, detector=_detector_results(detection),
                        api=_api_results(api), training=_training_results(trained, statuses),
                        data=_data_results(validation, subset), checks=statuses,
                        pipeline_latency_p95_ms=pipeline.get("p95") if detection else classifier.latency_p95_ms)


def _detector_results(detection: Optional[Mapping[str, Any]]) -> Optional[DetectorResults]:
    if not detection:
        return None
    return DetectorResults(detection.get("mAP_0.5"), detection.get("mAP_0.5_0.95"), detection.get("precision"),
                           detection.get("recall"), detection.get("inference_time_ms"))


def _api_results(api: Optional[Mapping[str, Any]]) -> Optional[ApiResults]:
    if not api:
        return None
    planned, sent = api.get("planned", api.get("requests")), api.get("requests") or 0
    success = 100.0 * (sent - api.get("errors", 0)) / planned if planned else None  # unsent = not answered
    return ApiResults(api.get("p95_ms"), api.get("throughput_img_s"), success, api.get("runs_on") or api.get("device"))


def _training_results(trained: Mapping[str, Mapping[str, Any]], checks: Mapping[str, Status]) -> TrainingResults:
    models = [t for t in trained.values() if t]
    rows = [row for t in models for row in t.get("epochs") or []]
    classifier = trained["classifier"]
    own = [row for row in classifier.get("epochs") or [] if row.get("data_time_s") is not None]
    peaks = [row["gpu_peak_mb"] for row in rows if row.get("gpu_peak_mb") is not None]
    mean = (lambda key: statistics.fmean(row[key] for row in own)) if own else (lambda key: None)
    probed = (classifier.get("auto_batch") or {}).get("probed")
    world = max(int(t.get("world_size") or 1) for t in models)
    hosts = [row["host_private_mb"] for row in rows if row.get("host_private_mb") is not None]
    return TrainingResults(
        throughput_img_s=classifier.get("mean_throughput"),
        batch_size_achieved=classifier.get("batch_size") if probed else None,
        gpu_memory_gb=max(peaks) / 1024 if peaks else None,
        data_time_s=mean("data_time_s"), compute_time_s=mean("compute_time_s"),
        repeated_oom=sum(len(t.get("oom_events") or []) for t in models),
        loss=(classifier.get("val_metrics") or {}).get("val_loss"),
        loss_variance=_later_half_variance([row["train_loss"] for row in classifier.get("epochs") or []]),
        memory_peak_to_avg=_peak_to_mean([row.get("gpu_peak_mb") or row.get("host_private_mb") for row in own]),
        memory_stable_hours=_stable_hours(rows, checks.get("memory_leak_test")), world_size=world,
        per_rank_throughput_img_s=classifier["mean_throughput"] / world if classifier.get("mean_throughput") else None,
        host_memory_peak_mb=max(hosts) if hosts else None)


def _later_half_variance(losses: List[float]) -> Optional[float]:
    """Convergence stability: the spread of the training loss once it should have settled (needs 4 epochs)."""
    later = losses[len(losses) // 2:]
    return statistics.pvariance(later) if len(losses) >= 4 and all(math.isfinite(x) for x in later) else None


def _peak_to_mean(values: List[Optional[float]]) -> Optional[float]:
    measured = [v for v in values if v]
    return max(measured) / statistics.fmean(measured) if len(measured) >= 2 else None


def _stable_hours(rows: List[Mapping[str, Any]], leak_test: Optional[Status]) -> Optional[float]:
    """Hours of training with memory within bounds (0 when the leak test failed; None when not measured)."""
    if leak_test not in (Status.PASS, Status.FAIL):
        return None
    seconds = sum(r.get("steps", 0) * ((r.get("data_time_s") or 0.0) + (r.get("compute_time_s") or 0.0))
                  for r in rows)
    return seconds / 3600 if leak_test == Status.PASS else 0.0


def _data_results(validation: Mapping[str, Any], subset: Mapping[str, Any]) -> DataResults:
    counts = validation.get("counts") or {}
    corrupt = sum(v for k, v in (validation.get("findings") or {}).items()
                  if k in ("unreadable_image", "size_mismatch"))
    images = counts.get("images")
    lost = validation.get("lost_classes")
    return DataResults(corrupt / images if images else None, subset.get("imbalance_ratio"),
                       None if lost is None else len(lost))


def _number(name: str, value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"results {name}={value!r} must be a number")
    return value


def _checked(kind, values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Numbers must be numbers: a string, a bool or a list where a measurement belongs names its field."""
    section = {ClassifierResults: "classifier", DetectorResults: "detector", ApiResults: "api",
               TrainingResults: "training", DataResults: "data"}[kind]
    for f in fields(kind):
        if "float" in f.type or f.type in ("int", "Optional[int]"):
            _number(f"{section}.{f.name}", values.get(f.name))
    return values
