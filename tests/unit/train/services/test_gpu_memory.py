"""GPU memory monitor: NVML, torch fallback, and the no-GPU path."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pillsnap.train.services.gpu_memory import MemoryMonitor, NvmlReader

GIB = 2**30


class NvmlLibraryNotFound(Exception):
    pass


class MissingNvml:
    """Like pynvml on a machine without the NVIDIA driver."""

    def __init__(self) -> None:
        self.init_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        raise NvmlLibraryNotFound("NVML Shared Library Not Found")


class FakeNvml:
    def __init__(self, used: int, total: int) -> None:
        self.used, self.total, self.shutdowns = used, total, 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used, total=self.total, free=self.total - self.used)

    def nvmlShutdown(self):
        self.shutdowns += 1


def no_gpu_monitor(nvml) -> MemoryMonitor:
    return MemoryMonitor(nvml_reader=NvmlReader(0, nvml), cuda_usage=lambda: None, torch_stats=lambda: None)


def test_no_gpu_returns_none_and_logs_once(caplog):
    nvml = MissingNvml()
    monitor = no_gpu_monitor(nvml)
    with caplog.at_level(logging.INFO, logger="pillsnap.train.services.gpu_memory"):
        assert monitor.check(0) is None and monitor.check(1) is None and monitor.check(2) is None
    lines = [r for r in caplog.records if "monitoring off" in r.getMessage()]
    assert len(lines) == 1 and "NVML Shared Library Not Found" in lines[0].getMessage()
    assert nvml.init_calls == 1  # NVML is not retried every epoch


def test_real_pynvml_without_driver_degrades_to_none():
    pytest.importorskip("pynvml")
    monitor = MemoryMonitor(cuda_usage=lambda: None, torch_stats=lambda: None)
    reader = NvmlReader(0)
    if reader.read() is not None:
        pytest.skip("this machine has a working NVIDIA driver")
    assert monitor.check(0) is None


def test_warns_above_80_percent(caplog):
    nvml = FakeNvml(used=14 * GIB, total=16 * GIB)
    monitor = MemoryMonitor(nvml_reader=NvmlReader(0, nvml), cuda_usage=lambda: None,
                            torch_stats=lambda: {"torch_allocated_bytes": 10 * GIB})
    with caplog.at_level(logging.WARNING, logger="pillsnap.train.services.gpu_memory"):
        report = monitor.check(3)
    assert report["warning"] and report["fraction"] == pytest.approx(14 / 16) and report["source"] == "nvml"
    assert report["torch_allocated_bytes"] == 10 * GIB and report["epoch"] == 3
    assert "oom/memory_warning" in caplog.text
    monitor.close()
    assert nvml.shutdowns == 1


def test_below_threshold_no_warning_and_torch_fallback(caplog):
    monitor = MemoryMonitor(nvml_reader=NvmlReader(0, MissingNvml()), cuda_usage=lambda: (4 * GIB, 16 * GIB),
                            torch_stats=lambda: None)
    with caplog.at_level(logging.WARNING, logger="pillsnap.train.services.gpu_memory"):
        report = monitor.check(0)
    assert report["source"] == "torch" and not report["warning"] and report["fraction"] == 0.25
    assert caplog.text == ""


def test_the_d10_line_shows_the_devices_nvml_memory_next_to_the_allocators(caplog):
    from pillsnap.train.services.telemetry import TBWriter, Telemetry

    def line(nvml) -> str:
        telemetry = Telemetry(TBWriter(Path("unused"), enabled=False), "[train]", 3, 1, torch.device("cpu"), nvml=nvml)
        with caplog.at_level(logging.INFO, logger="pillsnap.train"):
            caplog.clear()
            telemetry.step(1, 1, 1, 10, 0.5, 1e-3, 8, 0.01, 0.1)
        return caplog.records[-1].getMessage()

    assert line(NvmlReader(0, FakeNvml(used=11 * GIB, total=16 * GIB))).endswith(" nvml=11264MB")
    assert "nvml=" not in line(NvmlReader(0, MissingNvml()))  # no driver: nothing claimed
