"""Device, precision and compile policy (Annex 3), and seeding (D-11). One log line says what was applied."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pillsnap.config import OptimizationConfig

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# Modes that need CUDA graphs, and what a CPU compiles instead (inductor has no CPU graphs to capture).
CPU_COMPILE_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass
class Policy:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = full fp32
    use_scaler: bool
    channels_last: bool
    compile_mode: str
    tf32: bool
    compile_backend: str = "inductor"
    notes: Tuple[str, ...] = ()  # why something differs from the config

    def describe(self) -> str:
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        backend = f" backend={self.compile_backend}" if self.compile_mode != "none" else ""
        why = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (f"device={self.device} amp={amp} grad_scaler={self.use_scaler} channels_last={self.channels_last} "
                f"compile={self.compile_mode}{backend} tf32={self.tf32}{why}")


def select_amp_dtype(policy: str, cuda: bool, bf16_supported: bool) -> torch.dtype:
    if policy == "auto":
        return torch.bfloat16 if bf16_supported else torch.float16
    if policy not in _DTYPES:
        raise ValueError(f"optimization.amp_dtype={policy!r} is not one of auto, bf16, fp16")
    return _DTYPES[policy]


def resolve_policy(cfg: OptimizationConfig, device: Optional[str] = None) -> Policy:
    """The configured precision, memory format and compilation, on whatever device there is.

    A CPU runs them too (bf16/fp16 autocast, channels_last and inductor are CPU features of torch), so a CPU run
    of the shipped config executes the code a GPU run does. Only what a CPU lacks changes, and the notes say so:
    CUDA-graph compile modes map to their nearest CPU mode, and TF32 is a CUDA matmul mode.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    notes = []
    bf16 = torch.cuda.is_bf16_supported() if cuda else True  # CPU autocast always has bf16
    dtype = select_amp_dtype(cfg.amp_dtype, cuda, bf16) if cfg.amp else None
    mode = cfg.torch_compile
    if not cuda and mode in CPU_COMPILE_MODES:
        mode = CPU_COMPILE_MODES[mode]
        notes.append(f"optimization.torch_compile={cfg.torch_compile} needs CUDA graphs: {mode} on {dev.type}")
    tf32 = cfg.tf32 and cuda
    if cfg.tf32 and not cuda:
        notes.append("tf32 is a CUDA matmul mode")
    return Policy(dev, dtype, dtype == torch.float16, cfg.channels_last, mode, tf32, cfg.compile_backend,
                  tuple(notes))


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


def _chain(exc: BaseException) -> list:
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = getattr(seen, "inner_exception", None) or seen.__cause__ or seen.__context__
    return chain


def _is_compile_error(exc: BaseException) -> bool:
    """The compiler failed (dynamo could not trace, a backend or inductor broke), as opposed to the model's own op
    failing while dynamo traced it (TorchRuntimeError: eager would raise the same error) or memory running out
    during compilation or CUDA-graph capture (an OOM: the D-8 state machine's, not a reason to train eagerly)."""
    from pillsnap.train.services.oom_state_machine import is_oom_error

    chain = _chain(exc)
    if is_oom_error(exc) or any(type(e).__name__ == "TorchRuntimeError" for e in chain):
        return False
    return any(type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) for e in chain)


def _first_line(exc: BaseException) -> str:
    """`Type: first line` of the innermost cause (dynamo's BackendCompilerFailed wraps the compiler's own error)."""
    root = _chain(exc)[-1]
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0][:300] if text else ''}"


class CompiledModel:
    """What a training step calls: the torch.compile'd model when the policy says so, the eager one otherwise.

    torch.compile is lazy: a backend that cannot compile fails at the first forward or backward (or at a later
    recompile), not at the compile call. `fall_back(exc)` switches to the eager model (one warning) when the
    compiled one failed with a compiler error; the caller then replays the step. Any other error (the model's own,
    an OOM) is not the compiler's: it is raised, or recovered from, with compile kept.
    """

    def __init__(self, model: nn.Module, mode: str, backend: Union[str, Callable, None] = None):
        self.eager, self.mode = model, mode
        self.current: nn.Module = model
        self.state = "eager"
        if mode == "none" and not callable(backend):
            return
        try:
            # Modes are inductor options; another backend (aot_eager, a test's callable) takes none.
            if backend in (None, "inductor"):
                self.current = torch.compile(model, mode=None if mode == "none" else mode)
            else:
                self.current = torch.compile(model, backend=backend)
            self.state = "compiled"
        except Exception as e:  # compile support varies by platform; eager always works
            log.warning("torch.compile(mode=%s) failed (%s: %s); training eagerly", mode, type(e).__name__, e)
            self.state = "fell_back"

    def __call__(self, *args, **kwargs):
        return self.current(*args, **kwargs)

    def fall_back(self, exc: BaseException) -> bool:
        if self.current is self.eager or not _is_compile_error(exc):
            return False
        log.warning("torch.compile(mode=%s) failed while running (%s); falling back to eager and replaying the step",
                    self.mode, _first_line(exc))
        self.current, self.state = self.eager, "fell_back"
        return True


def set_seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
