"""train.strategy=interleaved (D-1, D-5): ONE loop over both units, d detector steps then c classifier steps.

Each model keeps its own epochs, optimizer, schedule, OOM state, early stopping and best.pt; a model that has
finished its epochs stops stepping while the other continues. Both share the precision policy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.train.loops.engine import EpochHook, StepHook, UnitLoop
from pillsnap.train.loops.members import Injectors, classifier_member, detector_member, run_policy
from pillsnap.train.results import TrainResult
from pillsnap.train.services.policy import Policy


def train_interleaved(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, stage: int, stage_dir: Path,
                      init_checkpoints: Optional[Dict[str, Optional[Path]]] = None,
                      plans: Optional[Dict[str, Dict]] = None, step_hook: Optional[StepHook] = None,
                      epoch_hook: Optional[EpochHook] = None, show_progress: bool = True,
                      policy: Optional[Policy] = None, compile_backend: Optional[Callable] = None,
                      injectors: Optional[Injectors] = None) -> Dict[str, TrainResult]:
    """Both models of one stage in one loop; returns {"detector": result, "classifier": result}.

    init_checkpoints: the previous approved stage's best.pt per model (warm start); plans: per model, the batch
    and worker plans.
    """
    d, c = (int(x) for x in cfg.train.interleave_ratio)
    if d <= 0 or c <= 0:
        raise ValueError(f"train.interleave_ratio={[d, c]}: interleaved training needs steps for both models; to "
                         "train one model alone use train.strategy=sequential")
    if not cfg.detection.enabled:
        raise ValueError("train.strategy=interleaved with detection.enabled=false: there is no detector to "
                         "interleave; use train.strategy=sequential")
    stage_dir, init = Path(stage_dir), init_checkpoints or {}
    policy = run_policy(cfg, policy)
    detector = detector_member(cfg, subset, stage, stage_dir, policy, init.get("detector"), compile_backend,
                               injectors, ratio=d)
    classifier = classifier_member(cfg, subset, class_map, stage_dir, policy, init.get("classifier"),
                                   show_progress, compile_backend, injectors, ratio=c)
    loop = UnitLoop(cfg, [detector, classifier], stage_dir / "checkpoints", stage_dir / "reports", "interleaved",
                    step_hook, epoch_hook, show_progress)
    loop.apply_plans(plans or {})
    return loop.run()
