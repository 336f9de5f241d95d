"""The CUDA-only paths, on a real GPU: unit probes, auto batch for both models, device augmentation, bf16 steps.

Skipped without CUDA (CI has none); run them on a GPU machine with `pytest tests/gpu`.
"""
from __future__ import annotations

import pytest
import torch

from pillsnap.config import AugmentConfig
from pillsnap.data.augment import BatchAugment
from tests.unit.train.support import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_stage(tiny_aihub):
    from pillsnap.data.aihub import import_aihub
    from pillsnap.data.class_map import build_class_map
    from pillsnap.data.manifest import assign_splits

    m = assign_splits(import_aihub(tiny_aihub, show_progress=False).manifest, 0.2, 0)
    return m, build_class_map(m)


@pytest.mark.parametrize("model", ["classifier", "detector"])
def test_auto_batch_probes_real_steps_and_restores_the_weights(make_config, tmp_path, tiny_stage, model):
    from pillsnap.train import tune_batch

    m, cmap = tiny_stage
    key = "classification" if model == "classifier" else "detection"
    cfg = make_config(tmp_path, "optimization.amp=true", f"train.{key}.auto_batch_tune=true",
                      f"train.{key}.auto_batch_max=32")
    plan = tune_batch(cfg, m, cmap, model)
    assert plan["probed"] and plan["device"] not in ("cpu", "test probes")
    peaks = [peak for _, peak in plan["probes"] if peak != "oom"]
    assert peaks == sorted(peaks) and plan["batch_size"] >= 4 and plan["memory_fraction"] > 0


def test_device_augmentation_matches_the_cpu_path():
    cfg = AugmentConfig(policy="randaugment")
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    seeds, boxes, labels = torch.arange(16), torch.tensor([[0.5, 0.5, 0.3, 0.3]] * 16), torch.zeros(16).long()
    cpu, _ = BatchAugment(cfg, 64, 3)(images, seeds, boxes, labels)
    gpu, _ = BatchAugment(cfg, 64, 3)(images.cuda(), seeds, boxes, labels.cuda())
    diff = (cpu - gpu.cpu()).abs()
    assert diff.mean() < 0.02 and torch.quantile(diff.flatten(), 0.99) < 0.1  # interpolation rounding only


@pytest.mark.parametrize("strategy", ["sequential", "interleaved"])
def test_bf16_training_with_channels_last_on_the_gpu(make_config, tmp_path, tiny_stage, strategy):
    results = run(make_config, tmp_path, tiny_stage, strategy, "optimization.amp=true", "optimization.amp_dtype=bf16",
                  "optimization.channels_last=true")
    for result in results.values():
        assert "device=cuda" in result.policy and "amp=bfloat16" in result.policy
        assert result.global_step > 0 and result.best_metric is not None
