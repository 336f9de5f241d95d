"""What one stage will do, decided before any work from the config and the ledger (the flow only sequences tasks):

    plan = plan_stage(cfg, stage, without_approved_predecessor)
    plan.models        the models it trains (the classifier, and the detector unless detection.enabled=false)
    plan.strategy      how: sequential (one after the other) or interleaved (d:c steps), one loop either way
    plan.warm_start    model -> the model the previous stage's approval judged (its pinned file, checked by sha256;
                       absent: from the pretrained weights)
    plan.baseline      the regression guard's comparison (the previous approved stage's accuracy, photo count and
                       validation rows hash)
    plan.predecessor   "" or the recorded reason a person gave to run without an approved previous stage

It raises StageRefused when the stage may not run (ledger.check_stage_may_run).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from pillsnap.config import PillSnapConfig
from pillsnap.core import layout
from pillsnap.evaluate.provenance import judged_model
from pillsnap.ledger import Ledger, StageRecord
from pillsnap.train import stage_models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    stage: int
    models: Tuple[str, ...]
    strategy: str
    warm_start: Dict[str, str] = field(default_factory=dict)
    baseline: Optional[Dict[str, Any]] = None
    predecessor: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "models": list(self.models)}

    @classmethod
    def from_dict(cls, doc: Dict[str, Any]) -> "StagePlan":
        return cls(**{**doc, "models": tuple(doc["models"])})


def plan_stage(cfg: PillSnapConfig, stage: int, without_approved_predecessor: str = "") -> StagePlan:
    ledger = Ledger.of(cfg.exp_dir)
    predecessor = ledger.check_stage_may_run(stage, without_approved_predecessor)
    models = stage_models(cfg)
    warm_start: Dict[str, str] = {}
    baseline = None
    previous = ledger.latest(stage - 1) if stage > 1 else None
    if previous is not None and previous.approved:
        for model in models:
            judged = _approved_model(cfg, previous, model)
            if judged is not None:
                warm_start[model] = str(judged)
        baseline = {"accuracy": previous.metrics.get("accuracy"), "photos": previous.metrics.get("n"),
                    "val_hash": (previous.evidence.get("data") or {}).get("val"), "stage": stage - 1}
    return StagePlan(stage, models, cfg.train.strategy, warm_start, baseline, predecessor)


def _approved_model(cfg: PillSnapConfig, record: StageRecord, model: str) -> Optional[Path]:
    """The file of `model` that the previous stage's approval judged, checked by its sha256 (ArtifactChanged names
    both hashes). A record from before content identity names no file: its stage's best.pt as it is now, said."""
    if record.evidence.get("models"):
        return judged_model(record.evidence["models"], model, f"Stage {record.stage}'s approved {model}")
    best = layout.best_checkpoint(cfg.exp_dir, record.stage, model)
    if best.is_file():
        log.warning("Stage %d's decision recorded no model hashes (an older ledger): warm start from %s as it is now",
                    record.stage, best)
        return best
    return None
