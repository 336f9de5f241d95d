"""Which device a step runs on (evaluation.device, inference.device) and how to name it in reports."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch


class DeviceUnavailable(RuntimeError):
    pass


def select_device(setting: str, key: str) -> torch.device:
    """auto = CUDA when present, else the CPU; an explicit cuda without a GPU is an error naming the key."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"{key}=cuda but no CUDA device is available; use {key}=auto or cpu")
    return torch.device(setting)


@lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """"cuda: NVIDIA H200" or "cpu: <model>", as reports show it next to every latency."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_name()}"


def evaluation_device(cfg) -> torch.device:
    """evaluation.device: auto = the training device (CUDA when present)."""
    return select_device(cfg.evaluation.device, "evaluation.device")


def serving_device(cfg) -> torch.device:
    """inference.device: where predict / serve run, and where the gates' latency is measured."""
    return select_device(cfg.inference.device, "inference.device")
