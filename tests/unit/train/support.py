"""Running the training loops on the tiny `ci` data, for the loop and OOM tests (both strategies)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from pillsnap.core.checkpoints import load_checkpoint
from pillsnap.train import train_stage

STRATEGIES = ("sequential", "interleaved")


def run(make_config, tmp: Path, tiny_stage, strategy: str, *overrides: str, **kwargs):
    """Train stage 1 with `strategy` through the one engine: {"detector": result, "classifier": result} (the
    detector first when sequential). `models=("classifier",)` trains the classifier alone."""
    m, cmap = tiny_stage
    # The step arithmetic of these tests counts the detector's combination photos only; the resume-exactness test
    # switches the shipped single photos back on (mosaic partners must not depend on the load history).
    cfg = make_config(tmp, f"train.strategy={strategy}", "train.deterministic=true",
                      "detection.include_single_images=false", *overrides)
    return train_stage(cfg, m, cmap, 1, tmp / "stage_1", show_progress=False, **kwargs)


def final_weights(stage_dir: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every model's raw weights from the run's last.pt."""
    payload = load_checkpoint(Path(stage_dir) / "checkpoints" / "last.pt")
    out = {"classifier": payload["model"]}
    if "detector" in payload["units"]:
        out["detector"] = payload["units"]["detector"]["model"]
    return out


def assert_same_weights(a: Dict[str, Dict[str, torch.Tensor]], b: Dict[str, Dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for model in a:
        for key, value in a[model].items():
            assert torch.equal(value, b[model][key]), f"{model}: {key}"


class RepeatedOom:
    """Raises a synthetic OOM `times` times at one step (FaultInjector fires once per step)."""

    def __init__(self, step: int, times: int):
        self.step, self.left = step, times

    def maybe_raise(self, step: int) -> None:
        if step == self.step and self.left:
            self.left -= 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (test injection at step {step})")
