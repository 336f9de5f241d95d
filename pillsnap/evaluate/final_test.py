"""D-6 final test: the evaluation of the sealed test split, after Stages 1-4 were approved in order.

Order matters, and is the point of this module: every precondition is checked from the ledger and the file
system FIRST (`check_final_test_allowed`): Stages 1-4 approved one after the other, Stage 4's mandatory checks (as
its decision applied them) `pass` or `attested`, the models to load ARE the ones Stage 4's decision judged (their
sha256), and no earlier final test of this Stage 4 (unless a named person forces it, with a reason). Only then is
the test split imported (AIHub `val/`, or the CSV rows with split=test). Nothing else in the library reads it.

The verdict carries its history: the results copy every stage's decision (who chose, what was overridden, who
attested what, the gates it applied looser than the shipped config), every earlier final test and every reopening;
after any override, a loosened gate, or a test measured with settings other than the shipped ones, the verdict is
READY_WITH_OVERRIDE naming each, never plain READY_FOR_PRODUCTION. Every run is kept: final_test_results_<n>.json
(n = how many times the sealed split has been evaluated), final_test_results.json (the newest), and a numbered
entry in the ledger.

Measured once: single-image classification (accuracy, macro-F1, top-5), detection mAP@0.5 on combination images
(when a detector exists; the shared NMS/mAP code), combination per-pill accuracy (every detection classified,
`pillsnap.evaluate.combination`), how many test photos have a training twin (the same bytes, by sha1, as a
train/val photo validation read). Then val vs test (overfitting gap, classifier and detector), the business goals,
a recommendation.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from pillsnap.config import PillSnapConfig, config_hash, describe_gate, pick, to_dict
from pillsnap.core.devices import evaluation_device
from pillsnap.core.identity import ArtifactChanged
from pillsnap.core.jsonio import write_json_atomic
from pillsnap.core import layout
from pillsnap.evaluate.provenance import judged_model
from pillsnap.ledger import FINAL_STAGE, STAGES, Ledger, StageRecord

log = logging.getLogger(__name__)
PASSING_CHECKS = ("pass", "attested")
READY, READY_WITH_OVERRIDE, NEEDS_IMPROVEMENT = "READY_FOR_PRODUCTION", "READY_WITH_OVERRIDE", "NEEDS_IMPROVEMENT"
# Business goals (D-6 "목표 달성 확인"): single-pill 92 % (macro-F1, and accuracy), combination mAP@0.5 0.85.
BUSINESS_GOALS: Tuple[Tuple[str, str, str, float], ...] = (
    ("single_accuracy", "classification", "accuracy", 0.92),
    ("single_macro_f1", "classification", "macro_f1", 0.92),
    ("combination_mAP_0.5", "detection", "mAP_0.5", 0.85),
)
_HOW = {"classification.accuracy": "more images per class, longer training, a larger backbone",
        "classification.macro_f1": "class weights or a weighted sampler for weak classes, more data for them",
        "detection.mAP_0.5": "more combination images, a larger detector scale, a higher detection.image_size"}
OVERFIT_GAP = 0.05  # val - test above this on any metric = overfitting suspected
# The settings that change the test's figures without changing a model: a test measured otherwise than the shipped
# config says is named in the verdict.
MEASUREMENT_KEYS = ("detection.conf_threshold", "detection.iou_threshold", "detection.max_det",
                    "inference.single_confidence_threshold", "inference.mode", "classification.crop_padding")


class FinalTestRefused(RuntimeError):
    """The final test may not run (yet, or again); the message says why."""


@dataclass(frozen=True)
class Forced:
    """A named person's decision to evaluate the sealed split again, and why (recorded in the results and ledger)."""
    reviewer: str
    reason: str

    def __post_init__(self):
        if not (self.reviewer.strip() and self.reason.strip()):
            raise FinalTestRefused("repeating the final test needs the person's name (--reviewer) and the reason "
                                   "(--reason): the sealed split's every evaluation is counted and named")


@dataclass(frozen=True)
class FinalTestPlan:
    classifier: Path
    detector: Optional[Path]
    record: StageRecord
    history: List[StageRecord]  # the records of Stages 1-4 the verdict rests on
    number: int  # this is the n-th evaluation of the sealed split
    earlier: List[Dict]  # every earlier final test (the ledger's entries)
    reopenings: List[Dict]  # every reopening of Stage 4 (who, why, when)


def results_path(cfg: PillSnapConfig, number: Optional[int] = None) -> Path:
    """The newest results, or run `number`'s."""
    name = "final_test_results.json" if number is None else f"final_test_results_{number:03d}.json"
    return layout.final_reports_dir(cfg.exp_dir) / name


def check_final_test_allowed(cfg: PillSnapConfig, forced: Optional[Forced] = None) -> FinalTestPlan:
    """Every precondition, from the ledger and file system only: no test file is touched here."""
    ledger = Ledger.of(cfg.exp_dir)
    problems = ledger.approved_in_order()
    if problems:
        raise FinalTestRefused(f"{ledger.path}: the final test runs after Stages 1-{FINAL_STAGE} were approved in "
                               f"order: {'; '.join(problems)}")
    rec = ledger.latest(FINAL_STAGE)
    mandatory = _applied_mandatory(cfg, rec)
    unmet = {n: rec.checks.get(n, "not recorded") for n in mandatory if rec.checks.get(n) not in PASSING_CHECKS}
    if unmet:
        raise FinalTestRefused(f"{ledger.path}: Stage {FINAL_STAGE}'s mandatory checks must be pass or attested "
                               f"before the sealed split is opened: {unmet} (attest with `pillsnap attest`, or "
                               f"re-run Stage {FINAL_STAGE})")
    if rec.override:
        log.warning("final test after a person's override of Stage %d (%s by %s): %s", FINAL_STAGE, rec.decision,
                    rec.reviewer, "; ".join(rec.overridden))
    classifier, detector = _approved_models(cfg, rec)
    last = ledger.final_test
    if last and rec.seq < last.get("seq", 0) and forced is None:
        raise FinalTestRefused(f"{ledger.path}: the final test already ran on this Stage {FINAL_STAGE} (run "
                               f"{last['number']}, {last.get('evaluated_at')}, {last.get('results')}); test data is "
                               f"evaluated once per Stage {FINAL_STAGE} (a named person may repeat it, with a reason: "
                               f"`pillsnap final-test --force --reviewer NAME --reason TEXT`; it is counted)")
    history = [ledger.latest(s) for s in STAGES]
    return FinalTestPlan(classifier, detector, rec, history, len(ledger.final_tests) + 1, list(ledger.final_tests),
                         list(ledger.reopenings))


def _applied_mandatory(cfg: PillSnapConfig, rec: StageRecord) -> List[str]:
    """The mandatory checks Stage 4's decision applied (its record's gates); the config at hand for a record from
    before gates were recorded."""
    applied = (rec.gates.get("applied") or {}).get(f"evaluation.stages.{FINAL_STAGE}.mandatory_checks")
    if applied is not None:
        return list(applied)
    return cfg.evaluation.stages[FINAL_STAGE].mandatory_checks if FINAL_STAGE in cfg.evaluation.stages else []


def _approved_models(cfg: PillSnapConfig, rec: StageRecord) -> Tuple[Path, Optional[Path]]:
    """The classifier and detector Stage 4's decision judged: their pinned files, checked by sha256 before the
    sealed split is opened (a replaced, retrained or missing file is refused with both hashes named)."""
    models = rec.evidence.get("models") or {}
    if not models.get("classifier"):
        raise FinalTestRefused(f"Stage {FINAL_STAGE}'s decision (ledger seq {rec.seq}) recorded no model hashes (a "
                               f"ledger from before decisions were bound to content): run Stage {FINAL_STAGE} again so "
                               "its decision names the models it approves")
    try:
        classifier = judged_model(models, "classifier", f"Stage {FINAL_STAGE}'s approved classifier")
        detector = judged_model(models, "detector", f"Stage {FINAL_STAGE}'s approved detector")
    except ArtifactChanged as e:
        raise FinalTestRefused(f"the models on disk are not the ones Stage {FINAL_STAGE}'s decision approved: {e}") \
            from None
    if cfg.detection.enabled and detector is None:
        log.warning("Stage %d's decision judged no detector: combination photos are not measured", FINAL_STAGE)
    return classifier, detector if cfg.detection.enabled else None


def load_test_split(cfg: PillSnapConfig) -> pd.DataFrame:
    """The sealed test split, imported now and kept in its own manifest under <exp_dir>/final/data/."""
    from pillsnap.data.aihub import import_aihub_test
    from pillsnap.data.csv_import import import_csv
    from pillsnap.data.manifest import write_manifest
    from pillsnap.data.prepare import source_root

    if cfg.data.source == "csv":
        result = import_csv(Path(cfg.paths.manifest_csv or ""), include_test=True, show_progress=False)
        test = result.manifest[result.manifest["split"] == "test"]
    else:
        test = import_aihub_test(source_root(cfg), show_progress=False).manifest
    if test.empty:
        raise FinalTestRefused(f"the sealed test split is empty ({cfg.data.source} source)")
    write_manifest(test, layout.final_data_dir(cfg.exp_dir) / "test_manifest.csv")
    return test.reset_index(drop=True)


def run_final_test(cfg: PillSnapConfig, forced: Optional[Forced] = None, config_file: str = "") -> Dict:
    """`forced`: who repeats the test on this Stage 4, and why. `config_file`: where this run's resolved config is
    kept (recorded with the config's hash: the settings change the test's figures)."""
    plan = check_final_test_allowed(cfg, forced)  # raises before any test file is opened
    log.info("final test: Stage %d approved; importing the sealed test split", FINAL_STAGE)
    test = load_test_split(cfg)
    predictor, labels = _predictor(cfg, plan)
    classification, unknown = _classification(predictor, test)
    detection = _detection(cfg, plan, test)
    combination = _combination(cfg, predictor, test) if plan.detector else \
        {"measured": False, "reason": "no Stage 4 detector checkpoint"}
    results: Dict = {
        "stage": FINAL_STAGE, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoints": {"classifier": str(plan.classifier), "detector": str(plan.detector) if plan.detector else None},
        "models": {m: v.get("sha256") for m, v in (plan.record.evidence.get("models") or {}).items()},
        "config": _measured_with(cfg, config_file),
        "test_data": {"source": cfg.data.source, "images": len(test),
                      "single_images": int((test["kind"] == "single").sum()),
                      "combination_images": int((test["kind"] == "combination").sum()),
                      "unknown_class_images": unknown, "classifier_classes": len(labels),
                      "training_twins": training_twins(cfg, test)},
        "test_results": {"classification": classification, "detection": detection, "combination": combination},
    }
    results["val_vs_test"] = _val_vs_test(plan.record, results["test_results"])
    results["business_goals"] = _business_goals(results["test_results"])
    results.update(_verdict(plan, results["business_goals"]["overall_target_met"], results["config"]),
                   forced=None if forced is None else {"reviewer": forced.reviewer.strip(),
                                                       "reason": forced.reason.strip()},
                   improvements=_improvements(results))
    path = write_json_atomic(results_path(cfg, plan.number), results)
    write_json_atomic(results_path(cfg), results)
    Ledger.of(cfg.exp_dir).record_final_test({"results": str(path), "evaluated_at": results["evaluated_at"],
                                              "recommendation": results["recommendation"], "forced": results["forced"],
                                              "models": results["models"], "config_sha256": results["config"]["sha256"],
                                              "overall_target_met": results["business_goals"]["overall_target_met"]})
    log.info("final test %d: %s -> %s", plan.number, results["recommendation"], path)
    return results


def _measured_with(cfg: PillSnapConfig, config_file: str) -> Dict:
    """The config the test was measured with: its hash and file, the settings that change the figures, and those
    of them that differ from the shipped config."""
    from pillsnap.config import load_config

    applied, shipped = to_dict(cfg), to_dict(load_config())
    values = {key: pick(applied, key) for key in MEASUREMENT_KEYS}
    differences = [{"key": key, "shipped": pick(shipped, key), "applied": value} for key, value in values.items()
                   if value != pick(shipped, key)]
    return {"sha256": config_hash(cfg), "file": config_file, "measurement": values, "differences": differences}


def training_twins(cfg: PillSnapConfig, test: pd.DataFrame) -> Dict:
    """How many test photos are byte-for-byte a train/val photo (sha1 against what validation read): a twin makes
    the test figures optimistic. Not measured when validation kept no hashes (data.validation.hash_duplicates)."""
    from pillsnap.data.prepare import photo_hashes_path
    from pillsnap.data.validate import read_photo_hashes

    path = photo_hashes_path(cfg)
    if not path.is_file():
        return {"measured": False, "reason": f"{path} is missing (validation keeps it when hash_duplicates is on)"}
    known = read_photo_hashes(path)
    twins = [p for p in test["image_path"] if hashlib.sha1(Path(p).read_bytes()).digest() in known]
    return {"measured": True, "photos": len(test), "twins": len(twins), "examples": twins[:5]}


def _verdict(plan: FinalTestPlan, goals_met: bool, measured_with: Dict) -> Dict:
    """The recommendation with the history it rests on: every override, every gate looser than the shipped config,
    every setting the test was measured with otherwise than shipped; the earlier final tests and the reopenings."""
    overrides = [f"Stage {r.stage}: {r.reviewer} approved over {'; '.join(r.overridden)}"
                 for r in plan.history if r.override]
    overrides += [f"Stage {r.stage}: gate {describe_gate(d)}" for r in plan.history for d in r.gates_loosened]
    overrides += [f"final test measured with {d['key']}={d['applied']!r} (shipped {d['shipped']!r})"
                  for d in measured_with["differences"]]
    if not goals_met:
        recommendation = NEEDS_IMPROVEMENT
    else:
        recommendation = READY_WITH_OVERRIDE if overrides else READY
    return {"recommendation": recommendation, "ready_for_production": recommendation == READY,
            "overrides": overrides, "stage_4_decision": plan.record.summary(),
            "stage_decisions": [r.summary() for r in plan.history],
            "sealed_split_evaluations": plan.number,
            "earlier_final_tests": [{k: t.get(k) for k in ("number", "evaluated_at", "recommendation", "forced",
                                                            "results")} for t in plan.earlier],
            "reopenings": [{k: r.get(k) for k in ("at", "reviewer", "reason", "after_final_tests")}
                           for r in plan.reopenings]}


def _predictor(cfg: PillSnapConfig, plan: FinalTestPlan):
    from pillsnap.data.class_map import ClassMap
    from pillsnap.data.prepare import class_map_path
    from pillsnap.models.classifier import load_classifier
    from pillsnap.infer.engines import TorchClassifierEngine, detector_engine
    from pillsnap.infer.predict import Predictor

    class_map = ClassMap.load(class_map_path(cfg))
    device = evaluation_device(cfg)
    model, labels = load_classifier(cfg, plan.classifier, class_map, device)
    loader = (lambda: detector_engine(cfg, plan.detector, "torch", device=device)) if plan.detector else None
    predictor = Predictor(TorchClassifierEngine(model, device), labels, cfg.classification.image_size,
                          cfg.classification.crop_padding, cfg.inference.single_confidence_threshold, loader)
    return predictor, labels


def _classification(predictor, test: pd.DataFrame) -> Tuple[Dict, int]:
    """Whole single-pill photos, the same preprocessing as validation; unknown K-codes are counted, not scored."""
    from pillsnap.metrics.classification import classification_metrics
    from pillsnap.infer.preprocess import crop_pixels, load_rgb, normalise_batch

    singles = test[test["kind"] == "single"]
    known = singles[singles["k_code"].isin(set(predictor.k_codes))]
    index = {k: i for i, k in enumerate(predictor.k_codes)}
    logits: List[np.ndarray] = []
    for start in range(0, len(known), 32):
        paths = known["image_path"].iloc[start:start + 32]
        crops = [crop_pixels(load_rgb(p), None, predictor.image_size, 0.0) for p in paths]
        logits.append(predictor.classifier.logits(normalise_batch(crops)))
    y_true = np.array([index[k] for k in known["k_code"]], dtype=np.int64)
    all_logits = np.concatenate(logits) if logits else np.zeros((0, len(index)), np.float32)
    metrics = classification_metrics(y_true, all_logits, predictor.k_codes)
    return metrics, int(len(singles) - len(known))


def _detection(cfg: PillSnapConfig, plan: FinalTestPlan, test: pd.DataFrame) -> Dict:
    if plan.detector is None:
        return {"measured": False, "reason": "no Stage 4 detector checkpoint"}
    from pillsnap.infer.detection import detection_samples, evaluate_detector, map_detector
    from pillsnap.models.detector import load_detector_checkpoint

    combos = test[test["kind"] == "combination"]
    if combos.empty:
        return {"measured": False, "reason": "the test split has no combination images"}
    model = load_detector_checkpoint(plan.detector, evaluation_device(cfg))
    metrics = evaluate_detector(map_detector(model, cfg.detection.image_size), detection_samples(combos),
                                cfg.detection.conf_threshold)
    return {"measured": True, **metrics}


def _combination(cfg: PillSnapConfig, predictor, test: pd.DataFrame) -> Dict:
    from pillsnap.evaluate.combination import combination_samples, evaluate_combinations
    from pillsnap.infer.preprocess import normalise_batch

    samples = combination_samples(test)
    if not samples:
        return {"measured": False, "reason": "the test split has no combination images"}
    classify = lambda crops: predictor.classifier.logits(normalise_batch(list(crops)))  # noqa: E731
    result = evaluate_combinations(samples, predictor.detector(), classify, predictor.k_codes,
                                   cfg.classification.crop_padding, cfg.classification.image_size)
    return {"measured": True, **result.as_dict()}


def _val_vs_test(record: StageRecord, test_results: Dict) -> Dict:
    """Stage 4 validation metrics (ledger) against the test metrics: gap = val - test."""
    val_det = record.metrics.get("detection") or {}
    test_cls, test_det = test_results["classification"], test_results["detection"]
    pairs = {f"classification.{k}": (record.metrics.get(k), test_cls.get(k)) for k in ("accuracy", "macro_f1", "top5")}
    pairs["detection.mAP_0.5"] = (record.metrics.get("mAP_0.5", val_det.get("mAP_0.5")), test_det.get("mAP_0.5"))
    out: Dict = {}
    for key, (val, test) in pairs.items():
        if _number(val) and _number(test):
            out[key] = {"val": float(val), "test": float(test), "gap": float(val) - float(test)}
    gaps = [v["gap"] for v in out.values()]
    return {"metrics": out, "max_gap": max(gaps) if gaps else None, "overfit_gap_threshold": OVERFIT_GAP,
            "overfitting_suspected": bool(gaps) and max(gaps) > OVERFIT_GAP}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _business_goals(test_results: Dict) -> Dict:
    goals: Dict = {}
    for name, section, metric, target in BUSINESS_GOALS:
        value = test_results.get(section, {}).get(metric)
        measured = _number(value)
        goals[name] = {"metric": f"{section}.{metric}", "target": target, "value": float(value) if measured else None,
                       "met": bool(measured and value >= target)}
        if not measured:
            goals[name]["reason"] = test_results.get(section, {}).get("reason", "not measured")
    goals["overall_target_met"] = all(g["met"] for g in goals.values())
    return goals


def _improvements(results: Dict) -> List[str]:
    out = []
    for name, goal in results["business_goals"].items():
        if name == "overall_target_met" or goal["met"]:
            continue
        if goal["value"] is None:
            out.append(f"{goal['metric']} was not measured ({goal.get('reason')}): train and ship a detector")
        else:
            out.append(f"raise {goal['metric']} from {goal['value']:.4f} to >= {goal['target']} "
                       f"({_HOW[goal['metric']]})")
    gap = results["val_vs_test"]
    if gap["overfitting_suspected"]:
        out.append(f"val-test gap {gap['max_gap']:.3f} > {OVERFIT_GAP}: overfitting suspected (stronger augmentation, "
                   f"regularisation, more varied data)")
    unknown = results["test_data"]["unknown_class_images"]
    if unknown:
        out.append(f"{unknown} test images show K-codes the classifier never learned: extend the class set")
    return out
