"""Values checked beyond their type, each error naming the dotted key and the source it came from."""
from __future__ import annotations

from typing import Any, Optional

from omegaconf import OmegaConf

from pillsnap.config.schema import ConfigError


# key -> allowed values
_CHOICES = {
    "data.source": {"aihub", "csv", "synthetic"},
    "detection.scale": {"n", "s", "m", "l", "x"},
    "detection.activation": {"silu", "relu", "leaky_relu"},
    "train.strategy": {"sequential", "interleaved"},
    "train.resume": {"none", "last"},
    "train.scheduler": {"cosine", "constant"},
    "train.early_stopping.mode": {"max", "min"},
    "optimization.amp_dtype": {"auto", "bf16", "fp16"},
    "optimization.torch_compile": {"none", "reduce-overhead", "max-autotune"},
    "optimization.compile_backend": {"inductor", "aot_eager", "eager"},
    "loss.class_weight_mode": {"inverse_frequency", "effective_number"},
    "inference.mode": {"single", "combo", "auto"},
    "inference.engine": {"torch", "onnx"},
    "inference.device": {"auto", "cpu", "cuda"},
    "evaluation.device": {"auto", "cpu", "cuda"},
    "orchestration.task_runner": {"local", "dask"},
    "augment.policy": {"none", "randaugment", "trivialaugment"},
    "dataloader.cache.format": {"auto", "raw", "jpeg"},
}


def check_values(cfg: Any, source: str) -> None:
    """Raises ConfigError on the first missing key or invalid value."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing required config key(s): {', '.join(missing)}")
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {sorted(allowed)}")
    ratio = list(cfg.train.interleave_ratio)
    if len(ratio) != 2 or min(ratio) < 0 or sum(ratio) == 0:
        raise ConfigError(f"{source}: train.interleave_ratio={ratio} must be two non-negative ints, not both 0")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"{source}: data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    if cfg.data.prepare.shard_size < 1:
        raise ConfigError(f"{source}: data.prepare.shard_size={cfg.data.prepare.shard_size} must be >= 1")
    if not 50 <= cfg.dataloader.cache.jpeg_quality <= 100:
        raise ConfigError(f"{source}: dataloader.cache.jpeg_quality={cfg.dataloader.cache.jpeg_quality} must be in "
                          "[50, 100]")
    bad = check_distributed_config(cfg.train.distributed)
    if bad:
        raise ConfigError(f"{source}: {bad}")
    bad = check_augment_config(cfg.augment)
    if bad:
        raise ConfigError(f"{source}: {bad}")


def check_distributed_config(cfg: Any, prefix: str = "train.distributed") -> Optional[str]:
    """The first invalid value, as 'key=value: why', or None (what needs the machine is checked at launch)."""
    n = str(cfg.nproc_per_node)
    if n != "auto" and not (n.isdigit() and int(n) >= 1):
        return f"{prefix}.nproc_per_node={cfg.nproc_per_node!r}: a number of processes >= 1, or auto"
    if cfg.nnodes < 1 or not 0 <= cfg.node_rank < cfg.nnodes:
        return f"{prefix}.node_rank={cfg.node_rank}: must be in [0, nnodes={cfg.nnodes})"
    if not cfg.timeout_minutes > 0:
        return f"{prefix}.timeout_minutes={cfg.timeout_minutes}: must be > 0"
    if cfg.backend not in ("auto", "nccl", "gloo"):
        return f"{prefix}.backend={cfg.backend!r}: one of auto, nccl, gloo"
    host, _, port = str(cfg.rdzv_endpoint).rpartition(":")
    if not host or not port.isdigit():
        return f"{prefix}.rdzv_endpoint={cfg.rdzv_endpoint!r}: host:port of node 0"
    return None


def check_augment_config(cfg: Any, prefix: str = "augment") -> Optional[str]:
    """The first invalid value, as 'key=value: why', or None."""
    if len(cfg.scale) != 2 or not 0 < cfg.scale[0] <= cfg.scale[1]:
        return f"{prefix}.scale={list(cfg.scale)}: need [low, high] with 0 < low <= high"
    for key in ("erasing", "mix_prob", "translate", "crop_view"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            return f"{prefix}.{key}={getattr(cfg, key)}: must be in [0, 1]"
    for key in ("brightness", "contrast", "saturation", "channel_gain", "mixup", "cutmix", "rotate_degrees"):
        if getattr(cfg, key) < 0:
            return f"{prefix}.{key}={getattr(cfg, key)}: must be >= 0"
    if not 0.0 <= cfg.hue <= 0.5:
        return f"{prefix}.hue={cfg.hue}: must be in [0, 0.5] (a fraction of a full turn)"
    if not 0 <= cfg.policy_magnitude < 31:
        return f"{prefix}.policy_magnitude={cfg.policy_magnitude}: must be in [0, 30]"
    return None
