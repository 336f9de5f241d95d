"""Stage checks: ONE registry, name -> (one-line definition, measurement from this run's artifacts).

Every name a stage lists in `evaluation.stages.N.mandatory_checks`, and the two flags Go/No-Go reads (no_crashes,
memory_stable), is measured here from what the stage produced (`StageEvidence`). Nothing is true by default:

  pass            measured, within its bound
  fail            measured, outside its bound (or a person said no to an attested check)
  not_measured    the run produced nothing to measure it from; it fails like `fail`
  not_applicable  the configuration rules it out (detector checks with detection.enabled=false); the report says
                  so; it neither passes nor blocks, and the shipped configuration never produces it
  attested        declared in `evaluation.checks.attested` (this pipeline cannot see it) and a named person
                  confirmed it (in the review, or ahead of the run with `pillsnap attest`)
  unattested      an attested check nobody named confirmed: it blocks approval like `fail`

The result is written to stage_<n>/reports/checks.json as {name: {status, measured, definition, mandatory}};
`pillsnap checks` lists every check with its definition and the stages that make it mandatory. A new check is a
measurement registered here (with `@check`) and, to gate a stage, its name in evaluation.stages.N.mandatory_checks.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from pillsnap.config import ChecksConfig, PillSnapConfig
from pillsnap.evaluate.results import Status

PASS, FAIL, NOT_MEASURED, ATTESTED, UNATTESTED = (Status.PASS, Status.FAIL, Status.NOT_MEASURED, Status.ATTESTED,
                                                  Status.UNATTESTED)
NOT_APPLICABLE = Status.NOT_APPLICABLE
PASSING = (PASS, ATTESTED)
STEP_TAGS = ("train/loss", "train/lr", "perf/data_time", "perf/compute_time", "perf/throughput")
MEMORY_TAGS = ("perf/cuda_mem", "perf/host_mem")  # the training device's memory: the GPU's, or the host's on a CPU
VAL_TAGS = {"classifier": ("val/loss", "val/accuracy", "val/macro_f1"), "detector": ("val/mAP_0.5",)}
CONSTANT_AFTER = 3  # a step tag with this many values, all equal, is a placeholder, not a measurement


@dataclass
class StageEvidence:
    """What one stage run produced, as the small dicts the tasks return (all optional: absent = not measured)."""
    stage: int
    subset: Dict[str, Any] = field(default_factory=dict)  # SubsetSummary as a dict
    train: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # model -> TrainResult.as_dict()
    evaluation: Dict[str, Any] = field(default_factory=dict)  # evaluate_classifier's metrics
    detector_probe: Optional[Dict[str, Any]] = None  # detector_answers()
    export: Optional[Dict[str, Any]] = None  # the export report
    api: Optional[Dict[str, Any]] = None  # api_smoke_test()
    tensorboard: Dict[str, Dict[str, Dict[str, float]]] = field(default_factory=dict)  # model -> {tag: stats}
    detection_expected: bool = True  # detection.enabled
    manifest: Optional[Dict[str, Any]] = None  # the release's own classes (data.validate.release_classes)


@dataclass(frozen=True)
class Outcome:
    status: Status
    measured: Any  # the numbers the verdict rests on
    detail: str = ""


Measure = Callable[[StageEvidence, PillSnapConfig], Outcome]
REGISTRY: Dict[str, Measure] = {}
DEFINITIONS: Dict[str, str] = {}
# The checks this pipeline cannot see, fixed here: a config's evaluation.checks.attested may only narrow them (a
# measured check made "a person's word" by configuration would let an API that never started be attested).
ATTESTABLE: set = set()


def check(name: str, definition: str) -> Callable[[Measure], Measure]:
    def register(fn: Measure) -> Measure:
        REGISTRY[name], DEFINITIONS[name] = fn, definition
        return fn
    return register


def attested_check(name: str, definition: str) -> None:
    DEFINITIONS[name] = definition
    ATTESTABLE.add(name)


def _verdict(ok: bool, measured: Any, detail: str = "") -> Outcome:
    return Outcome(PASS if ok else FAIL, measured, detail)


def _missing(what: str) -> Outcome:
    return Outcome(NOT_MEASURED, None, f"not measured: {what}")


NO_DETECTOR = Outcome(NOT_APPLICABLE, None, "detection.enabled is false: no detector is trained or served")


def _models(ev: StageEvidence) -> List[str]:
    return ["classifier", "detector"] if ev.detection_expected else ["classifier"]


def _epochs(ev: StageEvidence, model: str) -> List[Dict[str, Any]]:
    return list((ev.train.get(model) or {}).get("epochs") or [])


def _finished(result: Mapping[str, Any]) -> bool:
    return result.get("epochs_completed", 0) >= result.get("epochs_planned", 1) or bool(result.get("stopped_early"))


# ---------------------------------------------------------------------------------------------- Stage 1
@check("classification_model_loading", "The stage's best classifier checkpoint loaded (its class map checked) and "
       "gave finite logits for every validation photo.")
def _classifier_loads(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    e = ev.evaluation
    if not e.get("checkpoint") or e.get("logits_finite") is None:
        return _missing("the classifier was not evaluated")
    measured = {"checkpoint": e["checkpoint"], "photos": e.get("n"), "logits_finite": e["logits_finite"]}
    return _verdict(bool(e.get("n")) and e["logits_finite"], measured)


@check("detection_model_loading", "The stage's best detector checkpoint loaded and gave a finite output for a "
       "validation photo.")
def _detector_loads(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if not ev.detection_expected:
        return NO_DETECTOR
    if ev.detector_probe is None:
        return _missing("the detector was not probed")
    return _verdict(bool(ev.detector_probe.get("loaded") and ev.detector_probe.get("output_finite")),
                    ev.detector_probe, ev.detector_probe.get("error", ""))


@check("onnx_conversion_success", "Every trained model exported to ONNX and the export's parity check against "
       "torch passed (export_report.json).")
def _onnx(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if ev.export is None:
        return _missing("the export did not run")
    exported = [m for m in _models(ev) if (ev.export.get(m) or {}).get("exported")]
    ok = bool(ev.export.get("ok")) and set(_models(ev)) <= set(exported)
    return _verdict(ok, {"exported": exported, "failures": ev.export.get("failures") or ev.export.get("error")})


@check("pipeline_complete", "Every step of the stage produced its result (each model trained to its last or "
       "early-stopped epoch, evaluation, export, API check) and both best checkpoints load and answer.")
def _pipeline_complete(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    steps = {f"train {m}": bool(ev.train.get(m)) and _finished(ev.train[m]) for m in _models(ev)}
    steps["evaluation"] = bool(ev.evaluation.get("n"))
    steps["export"] = _onnx(ev, cfg).status == PASS
    steps["api check"] = _api(ev, cfg).status == PASS
    steps["classifier loads"] = _classifier_loads(ev, cfg).status == PASS
    if ev.detection_expected:
        steps["detector loads"] = _detector_loads(ev, cfg).status == PASS
    missing = [k for k, ok in steps.items() if not ok]
    return _verdict(not missing, steps, f"unfinished: {', '.join(missing)}" if missing else "")


# ---------------------------------------------------------------------------------------------- Stage 2
@check("auto_batch_tuning_success", "Each model's batch plan came from real training steps probed on its device "
       "(the GPU allocator's peak on CUDA, the process's resident memory on a CPU) and the batch it trained at fits "
       "within train.auto_batch_vram_headroom of that memory; a batch kept without probing is not measured.")
def _auto_batch(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    plans = {m: (ev.train.get(m) or {}).get("auto_batch") for m in _models(ev)}
    if any(p is None for p in plans.values()):
        return _missing(f"no batch plan for {[m for m, p in plans.items() if p is None]}")
    measured = {m: {"probed": p.get("probed"), "device": p.get("device"), "batch_size": p.get("batch_size"),
                    "memory_fraction": p.get("memory_fraction"), "probes": len(p.get("probes") or []),
                    "reasons": p.get("reasons")} for m, p in plans.items()}
    unprobed = [m for m, p in plans.items() if not (p.get("probed") and p.get("probes"))]
    if unprobed:
        return Outcome(NOT_MEASURED, measured, f"not measured: no probe ran for {unprobed} "
                       f"({'; '.join(r for m in unprobed for r in plans[m].get('reasons') or [])})")
    headroom = cfg.train.auto_batch_vram_headroom
    ok = all(p.get("batch_size", 0) >= 1 and p.get("memory_fraction") is not None and p["memory_fraction"] <= headroom
             for p in plans.values())
    return _verdict(ok, {**measured, "headroom": headroom})


@check("tensorboard_logging", "Each model's TensorBoard event files hold every Annex 7 tag (train/loss, train/lr, "
       "perf/data_time, perf/compute_time, perf/throughput, the training device's memory: perf/cuda_mem on CUDA, "
       "perf/host_mem on a CPU, and its validation tags) with values; a step tag whose values are all equal, or a "
       "memory tag of zeros, is a placeholder and fails.")
def _tensorboard(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    problems: Dict[str, List[str]] = {}
    for m in _models(ev):
        tags = ev.tensorboard.get(m, {})
        found = [f"missing {t}" for t in (*STEP_TAGS, *VAL_TAGS[m]) if not (tags.get(t) or {}).get("values")]
        memory = [t for t in MEMORY_TAGS if (tags.get(t) or {}).get("values")]
        found += [] if memory else [f"missing a memory tag ({' or '.join(MEMORY_TAGS)})"]
        found += [f"{t} is all zeros" for t in memory if tags[t]["min"] == tags[t]["max"] == 0]
        found += [f"{t} is constant ({tags[t]['min']:g}) over {tags[t]['values']} values"
                  for t in (*STEP_TAGS, *memory) if t != "train/lr" and (tags.get(t) or {}).get("values", 0)
                  >= CONSTANT_AFTER and tags[t]["min"] == tags[t]["max"]]
        if found:
            problems[m] = found
    measured = {m: len(ev.tensorboard.get(m, {})) for m in _models(ev)}
    return _verdict(not problems, {"tags": measured, "problems": problems})


@check("class_balance_verification", "The stage's training photos per class were counted and the ratio most / "
       "fewest is <= evaluation.advisor.max_class_imbalance_ratio.")
def _class_balance(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    ratio = ev.subset.get("imbalance_ratio")
    if ratio is None:
        return _missing("the subset has no per-class counts")
    limit = cfg.evaluation.advisor.max_class_imbalance_ratio
    return _verdict(ratio <= limit, {"imbalance_ratio": ratio, "limit": limit,
                                     "per_class": [ev.subset.get("per_class_train_min"),
                                                   ev.subset.get("per_class_train_max")]})


def _late(epochs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return epochs[1:] or epochs  # the first epoch warms caches, workers and kernels


@check("memory_optimization_working", "Every classifier training sample is served from the pixel cache, and each "
       "model's data time is <= evaluation.checks.max_data_share of its step time (epochs after the first).")
def _memory_optimization(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    coverage = ((ev.train.get("classifier") or {}).get("data") or {}).get("pixel_cache")
    if not coverage:
        return _missing("the classifier reported no pixel-cache coverage")
    shares = {}
    for m in _models(ev):
        values = [r["data_share"] for r in _late(_epochs(ev, m)) if r.get("data_share") is not None]
        if not values:
            return _missing(f"no per-epoch data share for the {m}")
        shares[m] = round(statistics.mean(values), 4)
    limit = cfg.evaluation.checks.max_data_share
    cached = bool(coverage.get("store")) and coverage.get("cached") == coverage.get("samples")
    return _verdict(cached and all(s <= limit for s in shares.values()),
                    {"pixel_cache": coverage, "data_share": shares, "limit": limit})


# ---------------------------------------------------------------------------------------------- Stage 3
def _growth(epochs: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [r.get(key) for r in epochs]
    if len(values) < 2 or values[0] is None or values[-1] is None:
        return None
    return float(values[-1] - values[0])


@check("memory_leak_test", "Private host memory and the GPU allocator's per-epoch peak grow by at most "
       "max_host_memory_growth_mb / max_gpu_memory_growth_mb from the end of the first epoch to the end of the "
       "last (each model; needs 2 epochs; GPU only where there is one).")
def _memory_leak(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    c: ChecksConfig = cfg.evaluation.checks
    measured: Dict[str, Dict[str, Optional[float]]] = {}
    for m in _models(ev):
        epochs = _epochs(ev, m)
        host = _growth(epochs, "host_private_mb")
        if host is None:
            return _missing(f"the {m} has {len(epochs)} epoch(s) of memory readings; 2 are needed")
        measured[m] = {"host_growth_mb": round(host, 1), "gpu_growth_mb": _growth(epochs, "gpu_peak_mb"),
                       "epochs": len(epochs)}
    ok = all(v["host_growth_mb"] <= c.max_host_memory_growth_mb and
             (v["gpu_growth_mb"] is None or v["gpu_growth_mb"] <= c.max_gpu_memory_growth_mb) for v in measured.values())
    return _verdict(ok, {**measured, "limits_mb": [c.max_host_memory_growth_mb, c.max_gpu_memory_growth_mb]})


def _oom_recoveries(ev: StageEvidence) -> int:
    return sum(len((ev.train.get(m) or {}).get("oom_events") or []) for m in _models(ev))


def _all_finite(ev: StageEvidence, model: str, key: str) -> bool:
    return all(r.get(key) is not None and math.isfinite(r[key]) for r in _epochs(ev, model))


@check("stability_test_pass", "Every epoch's training loss and monitored validation metric of each model are "
       "finite, and OOM recoveries stay <= evaluation.advisor.max_repeated_oom.")
def _stability(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if any(not _epochs(ev, m) for m in _models(ev)):
        return _missing("a model has no completed epoch")
    problems = {f"{m} {key}": "not finite in every epoch" for m in _models(ev) for key in ("train_loss", "monitor")
                if not _all_finite(ev, m, key)}
    ooms, limit = _oom_recoveries(ev), cfg.evaluation.advisor.max_repeated_oom
    return _verdict(not problems and ooms <= limit, {"problems": problems, "oom_recoveries": ooms, "limit": limit})


def _median_halves(values: Sequence[float]) -> tuple[float, float]:
    half = len(values) // 2
    return statistics.median(values[:half]), statistics.median(values[half:])


@check("scalability_test_pass", "Each model's training throughput (img/s) in the later half of its warm epochs "
       "(every epoch after the first, which fills caches, starts workers and compiles) is at least 1 - "
       "evaluation.checks.max_throughput_drop of the earlier half's (medians; needs 3 epochs).")
def _scalability(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    limit, measured = cfg.evaluation.checks.max_throughput_drop, {}
    for m in _models(ev):
        values = [r["throughput_img_s"] for r in _epochs(ev, m)[1:] if r.get("throughput_img_s")]
        if len(values) < 2:
            return _missing(f"the {m} has {len(values)} warm epoch(s) of throughput; 2 after the first are needed")
        early, late = _median_halves(values)
        measured[m] = {"early_img_s": round(early, 2), "late_img_s": round(late, 2),
                       "drop": round(max(0.0, 1 - late / early), 4)}
    return _verdict(all(v["drop"] <= limit for v in measured.values()), {**measured, "limit": limit})


@check("multi_batch_processing", "Validation photos classified in batches of evaluation.checks.multi_batch_size "
       "get the same top-1 as one at a time (serving preprocessing): top-1 flips over all photos <= "
       "evaluation.checks.multi_batch_max_flip_rate x photos, a tolerance for fp32 rounding fixed in advance.")
def _multi_batch(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    mb = ev.evaluation.get("multi_batch")
    if not mb or not mb.get("photos") or mb.get("flips") is None:
        return _missing("no batch-consistency measurement")
    allowed = math.floor(cfg.evaluation.checks.multi_batch_max_flip_rate * mb["photos"])
    return _verdict(mb["flips"] <= allowed and mb["batch_size"] > 1, {**mb, "flips_allowed": allowed})


# ---------------------------------------------------------------------------------------------- Stage 4
@check("full_dataset_processing", "The stage trained on every class of the release that has a usable training "
       "photo, counted from manifest.csv BEFORE the quarantine and from the label files that failed to import (not "
       "from the subset's own summary); at most data.stages.N.max_lost_classes classes (0 when unset) lost all their "
       "photos to the quarantine or to import issues, each named; and on the training photos asked for (or every "
       "usable one).")
def _full_dataset(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    s, m = ev.subset, ev.manifest
    if not m or "usable_classes" not in m or "train_k_codes" not in s:
        return _missing("the manifest's or the subset's training classes were not counted")
    left_out = sorted(set(m["usable_classes"]) - set(s["train_k_codes"]))
    bound = cfg.stage(ev.stage).max_lost_classes or 0
    asked = s.get("images_requested")
    wanted = m["usable_photos"] if asked is None else min(asked, m["usable_photos"])
    measured = {"classes": len(s["train_k_codes"]), "release_classes": m["classes"], "classes_left_out": left_out[:20],
                "lost_classes": len(m["lost"]), "max_lost_classes": bound, "lost": dict(list(m["lost"].items())[:20]),
                "train_photos": s["train_single"], "train_photos_wanted": wanted}
    return _verdict(not left_out and len(m["lost"]) <= bound and s["train_single"] >= wanted, measured)


@check("production_api_deployment", "`pillsnap serve` started on the stage's exports, answered /ready, and answered "
       "every smoke request, its first answer equal to the in-process pipeline's.")
def _api(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if ev.api is None:
        return _missing("the API check did not run")
    keys = ("deployed", "engine", "device", "runs_on", "ready_s", "requests", "errors", "p95_ms", "throughput_img_s",
            "reason")
    return _verdict(bool(ev.api.get("deployed")), {k: ev.api.get(k) for k in keys if k in ev.api})


@check("automated_monitoring", "The API's /metrics counted every predict answer the smoke clients received, in its "
       "request counter and its latency histogram.")
def _monitoring(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if ev.api is not None and not ev.api.get("deployed"):
        return _verdict(False, {"deployed": False, "reason": ev.api.get("reason")}, "the API never served")
    scraped = (ev.api or {}).get("monitoring")
    if not scraped:
        return _missing("/metrics was not scraped (the API check did not get that far)")
    return _verdict(bool(scraped.get("ok")), scraped)


attested_check("cloudflare_tunnel_setup", "A named person confirms that the Cloudflare tunnel to the API is set up, "
               "in the review pause or ahead of the run with `pillsnap attest` (attested: this pipeline cannot see it).")


# ---------------------------------------------------------------------------------------------- Go/No-Go flags
@check("no_crashes", "Every model trained to its last or early-stopped epoch with finite losses (a crash that a "
       "task retry recovered is reported with the step it resumed from).")
def _no_crashes(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    if any(not ev.train.get(m) for m in _models(ev)):
        return _missing("a model's training result is missing")
    measured = {m: {"finished": _finished(ev.train[m]), "resumed_from_step": ev.train[m].get("resumed_from_step"),
                    "losses_finite": _all_finite(ev, m, "train_loss")} for m in _models(ev)}
    return _verdict(all(v["finished"] and v["losses_finite"] for v in measured.values()), measured)


@check("memory_stable", "memory_leak_test passes and OOM recoveries stay <= evaluation.advisor.max_repeated_oom.")
def _memory_stable(ev: StageEvidence, cfg: PillSnapConfig) -> Outcome:
    leak = _memory_leak(ev, cfg)
    if leak.status == NOT_MEASURED:
        return leak
    ooms, limit = _oom_recoveries(ev), cfg.evaluation.advisor.max_repeated_oom
    return _verdict(leak.status == PASS and ooms <= limit, {"memory_leak_test": leak.status, "oom_recoveries": ooms})


# ---------------------------------------------------------------------------------------------- running them
@dataclass(frozen=True)
class MeasuredCheck:
    name: str
    status: Status
    measured: Any
    definition: str
    mandatory: bool
    detail: str = ""


def run_checks(cfg: PillSnapConfig, evidence: StageEvidence,
               attestations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, MeasuredCheck]:
    """Measure every check; `attestations` holds the named persons' answers for the attested ones (see
    `attestation`; absent = unattested)."""
    mandatory = set(cfg.evaluation.stages[evidence.stage].mandatory_checks) if evidence.stage in \
        cfg.evaluation.stages else set()
    attested = set(cfg.evaluation.checks.attested) & ATTESTABLE  # the config may narrow, never widen, them
    out = {}
    for name in DEFINITIONS:  # every check at every stage; the stage's mandatory ones gate
        if name in attested:
            outcome = attestation(name, (attestations or {}).get(name))
        elif name in ATTESTABLE:  # narrowed out of evaluation.checks.attested: nothing here can measure it
            outcome = Outcome(NOT_MEASURED, None, "not measured: only a person can confirm it, and "
                              "evaluation.checks.attested leaves it out")
        else:
            try:
                outcome = REGISTRY[name](evidence, cfg)
            except (KeyError, TypeError, ValueError) as e:  # malformed evidence: say so, never pass
                outcome = Outcome(NOT_MEASURED, None, f"could not measure: {type(e).__name__}: {e}")
        out[name] = MeasuredCheck(name, outcome.status, outcome.measured, DEFINITIONS[name], name in mandatory,
                                outcome.detail)
    return out


def attestation(name: str, answer: Optional[Mapping[str, Any]]) -> Outcome:
    """`answer`: {"confirmed": bool, "reviewer": name, "at": ISO time, "source": "review" | "ledger"}. A
    confirmation counts only with a person's name; the outcome's `measured` names who and when."""
    if answer is None:
        return Outcome(UNATTESTED, None, "nobody confirmed it: attest it in the review or with `pillsnap attest`")
    who = str(answer.get("reviewer") or "").strip()
    if not who:
        return Outcome(UNATTESTED, dict(answer), "a confirmation without a person's name does not count")
    if not answer.get("confirmed"):
        return Outcome(FAIL, dict(answer), f"{who} said it is not in place")
    return Outcome(ATTESTED, dict(answer), f"confirmed by {who} ({answer.get('source', 'review')}, "
                   f"{answer.get('at', 'time not recorded')})")


def checks_document(results: Mapping[str, MeasuredCheck]) -> Dict[str, Dict[str, Any]]:
    """checks.json: {name: {status, measured, definition, mandatory, detail}}."""
    return {name: {**{k: v for k, v in asdict(r).items() if k != "name"}, "status": r.status.value}
            for name, r in results.items()}


def read_tensorboard_tags(logdir: Path) -> Dict[str, Dict[str, float]]:
    """{tag: {values, min, max}} over every event file under `logdir` ({} when there is none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stats: Dict[str, Dict[str, float]] = {}
    logdir = Path(logdir)
    for run in sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")}) if logdir.is_dir() else []:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            values = [e.value for e in acc.Scalars(tag)]
            if not values:
                continue
            s = stats.setdefault(tag, {"values": 0, "min": math.inf, "max": -math.inf})
            s.update(values=s["values"] + len(values), min=min(s["min"], min(values)), max=max(s["max"], max(values)))
    return stats
