"""What one stage will do, decided before any work from the config and the ledger (the flow only sequences tasks):

    plan = plan_stage(cfg, stage, without_approved_predecessor)
    plan.models        the models it trains (the classifier, and the detector unless detection.enabled=false)
    plan.strategy      how: sequential (one after the other) or interleaved (d:c steps), one loop either way
    plan.warm_start    model -> the previous approved stage's best.pt (absent: from the pretrained weights)
    plan.baseline      the regression guard's comparison (the previous approved stage's accuracy and photos)
    plan.predecessor   "" or the recorded reason a person gave to run without an approved previous stage

It raises StageRefused when the stage may not run (ledger.check_stage_may_run).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

from pillsnap.config import PillSnapConfig
from pillsnap.core import layout
from pillsnap.ledger import Ledger
from pillsnap.train import stage_models


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
            best = layout.best_checkpoint(cfg.exp_dir, stage - 1, model)
            if best.is_file():
                warm_start[model] = str(best)
        baseline = {"accuracy": previous.metrics.get("accuracy"), "photos": previous.metrics.get("n"),
                    "stage": stage - 1}
    return StagePlan(stage, models, cfg.train.strategy, warm_start, baseline, predecessor)
