"""The one typed configuration: dataclass schema, YAML load/merge, validation, CLI dotlist overrides.

Precedence: CLI dotlist > profile > base file. Every error names the dotted key and the source it came from.
No other module reads YAML or environment variables for settings; they receive a `PillSnapConfig`.

    schema.py      the sections (dataclasses) and ConfigError
    evaluation.py  the evaluation sections: stage targets, advisor, checks
    checks.py      values checked beyond their type
    gates.py       the gates a stage is judged by, and their differences from the shipped file
    load.py        load_config / from_dict / to_dict and the config's hashes
"""
from pillsnap.config.checks import check_augment_config, check_distributed_config
from pillsnap.config.evaluation import (
    TargetSpec, StageCriteria, RecommendationThresholds, AdvisorConfig, ChecksConfig, EvaluationConfig,
)
from pillsnap.config.gates import describe_gate, gates_record
from pillsnap.config.load import (
    DEFAULT_CONFIG, PROFILE_DIR, REPO_ROOT, config_fingerprint, config_hash, from_dict, load_config, pick,
    profile_path, save_resolved, to_dict, to_yaml,
)
from pillsnap.config.schema import (
    ConfigError, PathsConfig, SynthConfig, StageSpec, ValidationConfig, PrepareConfig, DataConfig,
    ClassificationConfig, DetectionConfig, AugmentConfig, EarlyStoppingConfig, EmaConfig, OomConfig,
    ModelTrainConfig, StageOverride, DistributedConfig, TrainConfig, OptimizationConfig, CacheConfig,
    DataloaderConfig, LossConfig, InferenceConfig, ExportConfig, ServeConfig, LoggingConfig, OrchestrationConfig,
    PillSnapConfig,
)

__all__ = [
    "AdvisorConfig", "AugmentConfig", "CacheConfig", "ChecksConfig", "ClassificationConfig", "ConfigError",
    "DEFAULT_CONFIG", "DataConfig", "DataloaderConfig", "DetectionConfig", "DistributedConfig", "EarlyStoppingConfig",
    "EmaConfig", "EvaluationConfig", "ExportConfig", "InferenceConfig", "LoggingConfig", "LossConfig",
    "ModelTrainConfig", "OomConfig", "OptimizationConfig", "OrchestrationConfig", "PROFILE_DIR", "PathsConfig",
    "PillSnapConfig", "PrepareConfig", "REPO_ROOT", "RecommendationThresholds", "ServeConfig", "StageCriteria",
    "StageOverride", "StageSpec", "SynthConfig", "TargetSpec", "TrainConfig", "ValidationConfig",
    "check_augment_config", "check_distributed_config", "config_fingerprint", "config_hash", "describe_gate",
    "from_dict", "gates_record", "load_config", "pick", "profile_path", "save_resolved", "to_dict", "to_yaml",
]
