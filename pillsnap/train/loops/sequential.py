"""train.strategy=sequential, classifier half: the engine loop with the classifier alone.

(The detector half of the sequential strategy runs on ultralytics' own trainer: loops/ultralytics.py.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import pandas as pd

from pillsnap.config import PillSnapConfig
from pillsnap.data.class_map import ClassMap
from pillsnap.train.loops.engine import EpochHook, StepHook, UnitLoop
from pillsnap.train.loops.members import Injectors, classifier_member, run_policy
from pillsnap.train.results import TrainResult
from pillsnap.train.services.policy import Policy


def train_classifier(cfg: PillSnapConfig, subset: pd.DataFrame, class_map: ClassMap, stage_dir: Path,
                     init_checkpoint: Optional[Path] = None, plans: Optional[Dict[str, Dict]] = None,
                     step_hook: Optional[StepHook] = None, epoch_hook: Optional[EpochHook] = None,
                     show_progress: bool = True, policy: Optional[Policy] = None,
                     compile_backend: Optional[Callable] = None, injectors: Optional[Injectors] = None) -> TrainResult:
    """Train the classifier of one stage subset; the label space is the global class map restricted to its classes.

    plans: {"batch": tune_batch's plan, "workers": tune_workers' plan} (cached by the orchestrator).
    """
    stage_dir = Path(stage_dir)
    policy = run_policy(cfg, policy)
    member = classifier_member(cfg, subset, class_map, stage_dir, policy, init_checkpoint, show_progress,
                               compile_backend, injectors)
    loop = UnitLoop(cfg, [member], stage_dir / "checkpoints", stage_dir / "reports", "sequential", step_hook,
                    epoch_hook, show_progress)
    loop.apply_plans({"classifier": plans or {}})
    return loop.run()["classifier"]
