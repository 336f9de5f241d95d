"""Device, precision and compile policy (Annex 3), and seeding (D-11). One log line says what was applied."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from pillsnap.config import OptimizationConfig

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Policy:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = full fp32
    use_scaler: bool
    channels_last: bool
    compile_mode: str
    tf32: bool

    def describe(self) -> str:
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        return (f"device={self.device} amp={amp} grad_scaler={self.use_scaler} channels_last={self.channels_last} "
                f"compile={self.compile_mode} tf32={self.tf32}")


def select_amp_dtype(policy: str, cuda: bool, bf16_supported: bool) -> torch.dtype:
    if policy == "auto":
        return torch.bfloat16 if bf16_supported else torch.float16
    if policy not in _DTYPES:
        raise ValueError(f"optimization.amp_dtype={policy!r} is not one of auto, bf16, fp16")
    return _DTYPES[policy]


def resolve_policy(cfg: OptimizationConfig, device: Optional[str] = None) -> Policy:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return Policy(dev, None, False, False, "none", False)
    dtype = select_amp_dtype(cfg.amp_dtype, True, torch.cuda.is_bf16_supported()) if cfg.amp else None
    return Policy(dev, dtype, dtype == torch.float16, cfg.channels_last, cfg.torch_compile, cfg.tf32)


def apply_global_settings(policy: Policy, deterministic: bool) -> None:
    if policy.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = policy.tf32
        torch.backends.cudnn.allow_tf32 = policy.tf32
        if policy.tf32:
            torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def prepare_model(model: nn.Module, policy: Policy) -> nn.Module:
    model = model.to(policy.device)
    if policy.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def try_compile(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile with a logged fallback to eager; 'none' returns the model unchanged."""
    if mode == "none":
        return model
    try:
        return torch.compile(model, mode=mode)
    except Exception as e:  # compile support varies by platform; eager always works
        log.warning("torch.compile(mode=%s) failed (%s: %s); falling back to eager", mode, type(e).__name__, e)
        return model


def set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
