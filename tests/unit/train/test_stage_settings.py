"""D-13 stage overrides: explicit per-stage keys plus small / large dataset heuristics, on a copy."""
from __future__ import annotations

import copy

import pytest

from pillsnap.config import ConfigError, StageOverride, load_config
from pillsnap.train.stage_settings import apply_stage_overrides


@pytest.fixture(scope="module")
def base_cfg():
    return load_config()


@pytest.fixture
def cfg(base_cfg):
    return copy.deepcopy(base_cfg)


def test_explicit_overrides_applied_to_a_copy(cfg):
    cfg.train.stage_overrides = {"stage_2": StageOverride(batch_size_override=32, compile_mode="none",
                                                          memory_format="contiguous", num_workers_override=4)}
    new, changes = apply_stage_overrides(cfg, 2)
    assert new.train.classification.batch_size == 32 and new.optimization.torch_compile == "none"
    assert new.optimization.channels_last is False and new.dataloader.num_workers == 4
    assert "train.classification.batch_size: 32 (stage override)" in changes
    assert len([c for c in changes if "stage override" in c]) == 4
    # the input is untouched
    assert cfg.train.classification.batch_size == 64 and cfg.optimization.torch_compile == "reduce-overhead"
    assert new is not cfg


def test_overrides_from_plain_dicts(cfg):
    cfg.train.stage_overrides = {"stage_1": {"num_workers_override": 2}}
    new, changes = apply_stage_overrides(cfg, 1)
    assert new.dataloader.num_workers == 2 and changes == ["dataloader.num_workers: 2 (stage override)"]


def test_small_dataset_caps_batch_maxima_and_compile(cfg):
    cfg.train.detection.auto_batch_max = 128
    cfg.train.classification.auto_batch_max = 256
    cfg.optimization.torch_compile = "max-autotune"
    new, changes = apply_stage_overrides(cfg, 1)
    assert new.train.detection.auto_batch_max == 64 and new.train.classification.auto_batch_max == 96
    assert new.optimization.torch_compile == "reduce-overhead" and len(changes) == 3


def test_large_dataset_maximises_but_explicit_override_wins(cfg, caplog):
    cfg.optimization.channels_last = False
    cfg.train.auto_batch_vram_headroom = 0.88
    new, changes = apply_stage_overrides(cfg, 3)
    assert new.optimization.torch_compile == "max-autotune" and new.optimization.channels_last
    assert new.train.auto_batch_vram_headroom == 0.92 and len(changes) == 3
    cfg.train.stage_overrides = {"stage_4": StageOverride(compile_mode="reduce-overhead")}
    new, changes = apply_stage_overrides(cfg, 4)
    assert new.optimization.torch_compile == "reduce-overhead"
    assert changes[-1] == "optimization.torch_compile: reduce-overhead (stage override)"


def test_large_dataset_keeps_compile_disabled(cfg):
    cfg.optimization.torch_compile = "none"
    new, _ = apply_stage_overrides(cfg, 4)
    assert new.optimization.torch_compile == "none"


def test_bad_override_values_name_the_key(cfg):
    cfg.train.stage_overrides = {"stage_3": StageOverride(compile_mode="fast")}
    with pytest.raises(ConfigError, match="train.stage_overrides.stage_3.compile_mode='fast'"):
        apply_stage_overrides(cfg, 3)
    cfg.train.stage_overrides = {"stage_3": StageOverride(memory_format="nhwc")}
    with pytest.raises(ConfigError, match="memory_format"):
        apply_stage_overrides(cfg, 3)
