"""A stage's checks end to end: gather the evidence from the run's results and files, measure every check,
write stage_<n>/reports/checks.json, and fold a reviewer's attestations in afterwards."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.core import layout
from pillsnap.core.jsonio import read_json, write_json_atomic
from pillsnap.evaluate.checks.registry import (PASSING, UNATTESTED, StageEvidence, attestation, checks_document,
                                               read_tensorboard_tags, run_checks)
from pillsnap.evaluate.detector_eval import detector_answers

log = logging.getLogger(__name__)


def checks_path(cfg: PillSnapConfig, stage: int) -> Path:
    return layout.reports_dir(cfg.exp_dir, stage) / "checks.json"


def _probe_photo(subset: pd.DataFrame) -> Optional[str]:
    """A validation photo for the detector probe: a combination photo when there is one."""
    val = subset[subset["split"] == "val"].sort_values(["kind", "image_id"])  # "combination" < "single"
    return str(val["image_path"].iloc[0]) if len(val) else None


def release_counts(cfg: PillSnapConfig) -> Optional[Dict[str, Any]]:
    """The release's own training classes, before the quarantine and with the import's failed label files, for
    full_dataset_processing: counted here, independently of the subset builder."""
    from pillsnap.data.manifest import read_manifest
    from pillsnap.data.prepare import data_dir, import_issues, manifest_path
    from pillsnap.data.validate import load_quarantine, release_classes

    path = manifest_path(cfg)
    if not path.is_file():
        return None
    return release_classes(read_manifest(path), load_quarantine(data_dir(cfg) / "quarantine.json"),
                           import_issues(cfg))


def stage_evidence(cfg: PillSnapConfig, stage: int, subset_rows: pd.DataFrame, subset: Dict[str, Any],
                   train: Dict[str, Optional[Dict]], evaluation: Dict, export: Optional[Dict],
                   api: Optional[Dict]) -> StageEvidence:
    trained = {m: r for m, r in train.items() if r}
    tensorboard = {m: read_tensorboard_tags(Path(r["tensorboard"])) for m, r in trained.items() if r.get("tensorboard")}
    probe = detector_answers(cfg, stage, _probe_photo(subset_rows)) if cfg.detection.enabled else None
    used = subset_rows[(subset_rows["split"] == "train") & (subset_rows["kind"] == "single")]["k_code"]
    return StageEvidence(stage=stage, subset={**subset, "train_k_codes": sorted(used.unique().tolist())},
                         train=trained, evaluation=evaluation, detector_probe=probe, export=export, api=api,
                         tensorboard=tensorboard, detection_expected=cfg.detection.enabled,
                         manifest=release_counts(cfg))


def measure_stage_checks(cfg: PillSnapConfig, evidence: StageEvidence,
                         attestations: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
    """Every check, written to checks.json; attested checks are attested only by `attestations` given with a
    person's name (ahead of the run); the review may add more (apply_attestations)."""
    doc = checks_document(run_checks(cfg, evidence, attestations))
    write_json_atomic(checks_path(cfg, evidence.stage), doc)
    failing = {n: c["status"] for n, c in doc.items() if c["status"] not in PASSING}
    log.info("stage %d checks: %d of %d pass%s", evidence.stage, len(doc) - len(failing), len(doc),
             f"; not passing: {failing}" if failing else "")
    return doc


def restore_checks(cfg: PillSnapConfig, stage: int, doc: Mapping[str, Any]) -> Dict[str, Any]:
    """checks.json as a decision measured it (before any attestation), for a re-judgement of that decision."""
    write_json_atomic(checks_path(cfg, stage), dict(doc))
    return dict(doc)


def apply_attestations(cfg: PillSnapConfig, stage: int,
                       answers: Optional[Mapping[str, Mapping[str, Any]]]) -> Dict[str, Any]:
    """The named persons' answers for the attested checks, written into checks.json; returns the updated document."""
    path = checks_path(cfg, stage)
    doc = read_json(path)
    for name in cfg.evaluation.checks.attested:
        outcome = attestation(name, (answers or {}).get(name))
        doc[name].update(status=outcome.status.value, measured=outcome.measured, detail=outcome.detail)
    write_json_atomic(path, doc)
    unattested = [n for n, c in doc.items() if c["status"] == UNATTESTED]
    if unattested:
        log.warning("stage %d: %s unattested: no named person confirmed them (review, or `pillsnap attest`)",
                    stage, ", ".join(unattested))
    return doc
