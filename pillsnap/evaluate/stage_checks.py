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
from pillsnap.evaluate.checks import (PASSING, UNATTESTED, StageEvidence, attestation, checks_document,
                                      read_tensorboard_tags, run_checks)
from pillsnap.evaluate.stage_detection import detector_answers

log = logging.getLogger(__name__)


def checks_path(cfg: PillSnapConfig, stage: int) -> Path:
    return layout.stage_dir(cfg.exp_dir, stage) / "reports" / "checks.json"


def _probe_photo(subset: pd.DataFrame) -> Optional[str]:
    """A validation photo for the detector probe: a combination photo when there is one."""
    val = subset[subset["split"] == "val"].sort_values(["kind", "image_id"])  # "combination" < "single"
    return str(val["image_path"].iloc[0]) if len(val) else None


def stage_evidence(cfg: PillSnapConfig, stage: int, subset_rows: pd.DataFrame, subset: Dict[str, Any],
                   train: Dict[str, Optional[Dict]], evaluation: Dict, export: Optional[Dict],
                   api: Optional[Dict]) -> StageEvidence:
    trained = {m: r for m, r in train.items() if r}
    tensorboard = {m: read_tensorboard_tags(Path(r["tensorboard"])) for m, r in trained.items() if r.get("tensorboard")}
    probe = detector_answers(cfg, stage, _probe_photo(subset_rows)) if cfg.detection.enabled else None
    return StageEvidence(stage=stage, subset=subset, train=trained, evaluation=evaluation, detector_probe=probe,
                         export=export, api=api, tensorboard=tensorboard, detection_expected=cfg.detection.enabled)


def measure_stage_checks(cfg: PillSnapConfig, evidence: StageEvidence) -> Dict[str, Dict[str, Any]]:
    """Every check, written to checks.json; attested checks start unattested (the review may confirm them)."""
    doc = checks_document(run_checks(cfg, evidence))
    write_json_atomic(checks_path(cfg, evidence.stage), doc)
    failing = {n: c["status"] for n, c in doc.items() if c["status"] not in PASSING}
    log.info("stage %d checks: %d of %d pass%s", evidence.stage, len(doc) - len(failing), len(doc),
             f"; not passing: {failing}" if failing else "")
    return doc


def apply_attestations(cfg: PillSnapConfig, stage: int, answers: Optional[Mapping[str, bool]]) -> Dict[str, Any]:
    """A reviewer's answers for the attested checks, written into checks.json; returns the updated document."""
    path = checks_path(cfg, stage)
    doc = read_json(path)
    for name in cfg.evaluation.checks.attested:
        outcome = attestation(name, None if answers is None else bool(answers.get(name)))
        doc[name].update(status=outcome.status, measured=outcome.measured, detail=outcome.detail)
    write_json_atomic(path, doc)
    unattested = [n for n, c in doc.items() if c["status"] == UNATTESTED]
    if unattested:
        log.warning("stage %d: %s unattested (nobody confirmed them in a review)", stage, ", ".join(unattested))
    return doc
