"""Config validation: every error names the key; precedence CLI > profile > base; resolved config written."""
import re
from pathlib import Path

import pytest
import yaml

from pillsnap.config import ConfigError, DEFAULT_CONFIG, config_hash, from_dict, load_config, save_resolved, to_dict


def _base_without(tmp_path: Path, *dotted: str) -> Path:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for key in dotted:
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        del node[leaf]
    out = tmp_path / "base.yaml"
    out.write_text(yaml.safe_dump(data, allow_unicode=True))
    return out


def test_production_defaults_load_with_the_spec_values():
    cfg = load_config()
    assert cfg.classification.backbone == "tf_efficientnetv2_s" and cfg.classification.image_size == 384
    assert cfg.detection.image_size == 640 and cfg.detection.scale == "m"
    assert (cfg.stage(1).classes, cfg.stage(1).images) == (50, 5000)
    assert cfg.stage(4).classes is None
    assert cfg.train.oom.max_retries == 4 and cfg.train.oom.max_grad_accum == 8
    assert cfg.train.auto_batch_vram_headroom == 0.88


def test_unknown_key_in_a_profile_is_named(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"train\.batch_sise") as e:
        load_config(profile=str(profile))
    assert str(profile) in str(e.value)


def test_unknown_key_on_the_command_line_is_named():
    with pytest.raises(ConfigError, match=r"dataloader\.num_workerz"):
        load_config(overrides=["dataloader.num_workerz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.classification\.batch_size"):
        load_config(overrides=["train.classification.batch_size=lots"])


@pytest.mark.parametrize("key", ["train.oom.max_retries", "train.oom.max_grad_accum", "train.oom.min_batch",
                                 "train.oom.cooldown_sec", "train.oom.escalate_to_fp16"])
def test_missing_oom_guard_key_fails_at_start(tmp_path, key):
    with pytest.raises(ConfigError, match=r"missing required config key\(s\): .*" + re.escape(key)):
        load_config(_base_without(tmp_path, key))


def test_value_outside_the_allowed_choices_is_named():
    with pytest.raises(ConfigError, match=r"optimization\.torch_compile='max-speed'"):
        load_config(overrides=["optimization.torch_compile=max-speed"])


def test_data_preparation_keys_are_checked():
    with pytest.raises(ConfigError, match=r"orchestration\.task_runner='ray'"):
        load_config(overrides=["orchestration.task_runner=ray"])
    with pytest.raises(ConfigError, match=r"data\.prepare\.shard_size=0"):
        load_config(overrides=["data.prepare.shard_size=0"])
    shipped = load_config()
    assert shipped.data.prepare.fill_cache and shipped.orchestration.task_runner == "local"


def test_malformed_override_and_unknown_profile():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.batch_size"])
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*cpu-demo"):
        load_config(profile="nope")


def test_precedence_cli_over_profile_over_base():
    base = load_config()
    profiled = load_config(profile="cpu-demo")
    both = load_config(profile="cpu-demo", overrides=["classification.image_size=112", "dataloader.num_workers=12"])
    assert base.classification.image_size == 384
    assert profiled.classification.image_size == 96
    assert both.classification.image_size == 112 and both.dataloader.num_workers == 12
    assert both.classification.backbone == profiled.classification.backbone  # the profile still applies


def test_resolved_config_round_trips_and_every_run_keeps_its_own(tmp_path):
    cfg = load_config(profile="ci", overrides=[f"paths.exp_dir={tmp_path}"])
    path = save_resolved(cfg, "run-a")
    other = load_config(profile="ci", overrides=[f"paths.exp_dir={tmp_path}", "data.stages.2.max_latency_ms=5000"])
    save_resolved(other, "run-b")
    assert path == tmp_path / "config.resolved.run-a.yaml"
    assert load_config(tmp_path / "config.resolved.yaml").data.stages[2].max_latency_ms == 5000  # the newest
    again = load_config(path)  # the resolved file is itself a valid config, and run a's is still there
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(from_dict(to_dict(cfg))) == config_hash(cfg)


def test_stage_tables_can_be_overridden_from_the_command_line():
    cfg = load_config(overrides=["data.stages.1.classes=10", "data.stages.2.min_accuracy=0.5"])
    assert cfg.stage(1).classes == 10 and cfg.stage(1).images == 5000 and cfg.stage(2).min_accuracy == 0.5


def test_a_config_dict_survives_a_json_round_trip():
    import json

    from pillsnap.config import from_dict, load_config, to_dict

    cfg = load_config()
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
