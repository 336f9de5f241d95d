"""One model's training telemetry: the D-10 log line and the Annex 7 TensorBoard tags, the same for both models.

    [train] e=3/30 s=40/312 loss=1.2345 lr=8.12e-04 data=0.012s comp=0.210s thr=290.4/s cuda=10240MB nvml=11873MB
    [train/det] e=…                                   (the detector's line; its tags go to stage_<n>/detector/tb)

TensorBoard: train/loss, train/lr, perf/data_time, perf/compute_time, perf/throughput every step, and the training
device's memory: perf/cuda_mem (the allocator's peak) on CUDA, perf/host_mem (this process's resident memory) on a
CPU, where the line says host=…MB (a CPU has no CUDA memory: writing 0 would be a placeholder, not a measurement);
val/<metric> every validation. On CUDA the line also shows `nvml=`: the device's used memory as the driver sees it
(CUDA context, cuDNN workspaces, other processes: what the allocator's peak misses), read when the line is printed. The writer degrades to a no-op (one warning) when tensorboard is missing.

Every epoch also closes with a resources record (`end_epoch`): throughput, mean data and compute time per step,
the data-time share, private host memory (this process and its loader workers) and the GPU allocator's peak. The stage checks
read it (memory_leak_test, scalability_test_pass, memory_optimization_working).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import psutil
import torch

from pillsnap.train.services.gpu_memory import NvmlReader

log = logging.getLogger("pillsnap.train")
STEP_TAGS = ("train/loss", "train/lr", "perf/data_time", "perf/compute_time", "perf/throughput")


class TBWriter:
    def __init__(self, logdir: Path, enabled: bool = True):
        self._writer = None
        self.logdir = Path(logdir)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            log.warning("TensorBoard unavailable (%s); metrics go to the log and metrics.json only", e)
            return
        self._writer = SummaryWriter(log_dir=str(self.logdir))

    def scalar(self, tag: str, value: Optional[float], step: int) -> None:
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def host_private_mb() -> float:
    """Private resident memory (RSS less file-backed pages) of this process and its DataLoader workers, in MiB.

    File-backed pages are left out on purpose: mapped files (libraries, a shard's rows being written) count in RSS
    while the kernel may drop them at will; a leak is anonymous memory. Workers that live for one pass (the
    classifier's validation loader) are gone when it is measured, at the epoch's end.
    """
    me, total = psutil.Process(), 0
    for process in (me, *me.children(recursive=True)):
        try:
            info = process.memory_info()
        except psutil.Error:  # a worker that just exited
            continue
        total += info.rss - getattr(info, "shared", 0)
    return total / 2**20


def _new_epoch() -> Dict[str, float]:
    return {"samples": 0, "steps": 0, "data_time": 0.0, "compute_time": 0.0}


def over_ranks(own: Dict[str, Any], every: List[Dict[str, Any]]) -> Dict[str, Any]:
    """An epoch's resources (end_epoch) over every rank: the throughput of the global batches as this rank timed
    them, each rank's own share of it, and the LARGEST rank's memory (a leak on rank 3 is a leak; rank 0 alone hid
    it)."""
    largest = lambda key: max((r[key] for r in every if r.get(key) is not None), default=None)  # noqa: E731
    ranks = [{"rank": i, "throughput_img_s": r["throughput_img_s"] / len(every) if r.get("throughput_img_s") else None,
              "host_private_mb": r.get("host_private_mb"), "gpu_peak_mb": r.get("gpu_peak_mb")}
             for i, r in enumerate(every)]
    return {**own, "host_private_mb": largest("host_private_mb"), "gpu_peak_mb": largest("gpu_peak_mb"),
            "ranks": ranks}


def cuda_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


class Telemetry:
    def __init__(self, tb: TBWriter, tag: str, epochs: int, log_interval: int, device: torch.device,
                 nvml: Optional[NvmlReader] = None):
        self.tb, self.tag, self.epochs = tb, tag, epochs
        self.log_interval, self.device = max(1, log_interval), device
        self._epoch = _new_epoch()
        self._process = psutil.Process()
        self._nvml = nvml or (NvmlReader(device.index or 0) if device.type == "cuda" else None)

    def step(self, step: int, epoch: int, step_in_epoch: int, steps_in_epoch: int, loss: float, lr: float,
             samples: int, data_time: float, compute_time: float) -> None:
        thr = samples / max(1e-9, data_time + compute_time)
        on_cuda = self.device.type == "cuda"
        memory = cuda_memory_mb(self.device) if on_cuda else self._process.memory_info().rss / 2**20
        for tag, value in zip((*STEP_TAGS, "perf/cuda_mem" if on_cuda else "perf/host_mem"),
                              (loss, lr, data_time, compute_time, thr, memory)):
            self.tb.scalar(tag, value, step)
        if step_in_epoch % self.log_interval == 0 or step_in_epoch == steps_in_epoch:
            log.info("%s e=%d/%d s=%d/%d loss=%.4f lr=%.2e data=%.3fs comp=%.3fs thr=%.1f/s %s=%.0fMB%s", self.tag,
                     epoch, self.epochs, step_in_epoch, steps_in_epoch, loss, lr, data_time, compute_time, thr,
                     "cuda" if on_cuda else "host", memory, self._nvml_text())
        e = self._epoch
        e["samples"], e["steps"] = e["samples"] + samples, e["steps"] + 1
        e["data_time"], e["compute_time"] = e["data_time"] + data_time, e["compute_time"] + compute_time

    def _nvml_text(self) -> str:
        used = self._nvml.read() if self._nvml is not None else None
        return f" nvml={used[0] / 2**20:.0f}MB" if used else ""

    def end_epoch(self) -> Dict[str, Optional[float]]:
        """This epoch's resources (see the module docstring); starts the next epoch's counts."""
        e, self._epoch = self._epoch, _new_epoch()
        busy, steps = e["data_time"] + e["compute_time"], max(1, e["steps"])
        gpu_peak = None
        if self.device.type == "cuda":
            gpu_peak = cuda_memory_mb(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return {"steps": e["steps"], "samples": e["samples"],
                "throughput_img_s": e["samples"] / busy if busy > 0 else None,
                "data_time_s": e["data_time"] / steps, "compute_time_s": e["compute_time"] / steps,
                "data_share": e["data_time"] / busy if busy > 0 else None,
                "host_private_mb": host_private_mb(), "gpu_peak_mb": gpu_peak}

    def validation(self, metrics: Mapping[str, Optional[float]], step: int, prefix: str = "val") -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.scalar(f"{prefix}/{'loss' if key == 'val_loss' else key}", value, step)

    def scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        for tag, value in values.items():
            self.tb.scalar(tag, value, step)
