"""D-8 (prevention): GPU memory use at the start of every epoch, warning above 80 %.

Device-wide use comes from NVML (pynvml, from nvidia-ml-py: it sees other processes too), else from
torch.cuda.mem_get_info; torch's own allocator counters are added when CUDA is available. Without a GPU
everything degrades to one info line and None.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

DEFAULT_WARN_FRACTION = 0.80


class NvmlReader:
    """Device memory (used, total) via NVML; initialised once, None for good when NVML is unavailable."""

    def __init__(self, device_index: int = 0, nvml: Any = None):
        self.device_index = device_index
        self._nvml = nvml
        self._handle: Any = None
        self.unavailable_reason: Optional[str] = None

    def _open(self) -> bool:
        if self._handle is not None:
            return True
        if self.unavailable_reason is not None:
            return False
        try:
            if self._nvml is None:
                import pynvml  # nvidia-ml-py; imported lazily so CPU-only installs never touch it

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            return True
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self.unavailable_reason = f"{type(exc).__name__}: {exc}"
            return False

    def read(self) -> Optional[Tuple[int, int]]:
        if not self._open():
            return None
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:  # noqa: BLE001 - a GPU that went away mid-run: stop asking
            self.unavailable_reason, self._handle = f"{type(exc).__name__}: {exc}", None
            return None
        return int(info.used), int(info.total)

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass


def torch_memory_stats(device: Optional[int] = None) -> Optional[Dict[str, int]]:
    """torch's allocator counters (allocated / reserved / peak bytes); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return {
        "torch_allocated_bytes": int(torch.cuda.memory_allocated(device)),
        "torch_reserved_bytes": int(torch.cuda.memory_reserved(device)),
        "torch_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
    }


def _torch_device_usage(device: Optional[int]) -> Optional[Tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), int(total)


class MemoryMonitor:
    """`check(epoch)` -> dict of GPU memory use (None without a GPU); warns above `warn_fraction`.

    The loop logs the dict's fraction next to the batch size to TensorBoard (D-8: usage vs batch size).
    """

    def __init__(
        self,
        warn_fraction: float = DEFAULT_WARN_FRACTION,
        device_index: int = 0,
        nvml_reader: Optional[NvmlReader] = None,
        cuda_usage: Optional[Callable[[], Optional[Tuple[int, int]]]] = None,
        torch_stats: Optional[Callable[[], Optional[Dict[str, int]]]] = None,
    ):
        self.warn_fraction = warn_fraction
        self._nvml = nvml_reader or NvmlReader(device_index)
        self._cuda_usage = cuda_usage or (lambda: _torch_device_usage(device_index))
        self._torch_stats = torch_stats or (lambda: torch_memory_stats(device_index))
        self._said_unavailable = False

    def check(self, epoch: int) -> Optional[Dict[str, Any]]:
        usage, source = self._nvml.read(), "nvml"
        if usage is None:
            usage, source = self._cuda_usage(), "torch"
        if usage is None:
            if not self._said_unavailable:  # once: the same line every epoch says nothing new
                logger.info("GPU memory monitoring off: no GPU (%s)", self._nvml.unavailable_reason or "no CUDA")
                self._said_unavailable = True
            return None
        used, total = usage
        report: Dict[str, Any] = {"epoch": epoch, "source": source, "used_bytes": used, "total_bytes": total,
                                  "fraction": used / total if total else 0.0}
        report.update(self._torch_stats() or {})
        report["warning"] = report["fraction"] > self.warn_fraction
        if report["warning"]:
            logger.warning("oom/memory_warning: epoch %d GPU memory %.1f%% used (%.2f of %.2f GiB) > %.0f%%",
                           epoch, 100 * report["fraction"], used / 2**30, total / 2**30, 100 * self.warn_fraction)
        return report

    def close(self) -> None:
        self._nvml.close()
