"""One model's training telemetry: the D-10 log line and the Annex 7 TensorBoard tags, the same for both models.

    [train] e=3/30 s=40/312 loss=1.2345 lr=8.12e-04 data=0.012s comp=0.210s thr=290.4/s cuda=10240MB
    [train/det] e=…                                   (the detector's line; its tags go to stage_<n>/detector/tb)

TensorBoard: train/loss, train/lr, perf/data_time, perf/compute_time, perf/throughput, perf/cuda_mem every step,
val/<metric> every validation. The writer degrades to a no-op (one warning) when tensorboard is missing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

log = logging.getLogger("pillsnap.train")
STEP_TAGS = ("train/loss", "train/lr", "perf/data_time", "perf/compute_time", "perf/throughput", "perf/cuda_mem")


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


def cuda_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


class Telemetry:
    def __init__(self, tb: TBWriter, tag: str, epochs: int, log_interval: int, device: torch.device):
        self.tb, self.tag, self.epochs = tb, tag, epochs
        self.log_interval, self.device = max(1, log_interval), device
        self.throughputs: list = []

    def step(self, step: int, epoch: int, step_in_epoch: int, steps_in_epoch: int, loss: float, lr: float,
             samples: int, data_time: float, compute_time: float) -> None:
        thr = samples / max(1e-9, data_time + compute_time)
        cuda = cuda_memory_mb(self.device)
        for tag, value in zip(STEP_TAGS, (loss, lr, data_time, compute_time, thr, cuda)):
            self.tb.scalar(tag, value, step)
        if step_in_epoch % self.log_interval == 0 or step_in_epoch == steps_in_epoch:
            log.info("%s e=%d/%d s=%d/%d loss=%.4f lr=%.2e data=%.3fs comp=%.3fs thr=%.1f/s cuda=%.0fMB", self.tag,
                     epoch, self.epochs, step_in_epoch, steps_in_epoch, loss, lr, data_time, compute_time, thr, cuda)
        self.throughputs.append(thr)

    def validation(self, metrics: Mapping[str, Optional[float]], step: int, prefix: str = "val") -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.scalar(f"{prefix}/{'loss' if key == 'val_loss' else key}", value, step)

    def scalars(self, values: Dict[str, Optional[float]], step: int) -> None:
        for tag, value in values.items():
            self.tb.scalar(tag, value, step)

    @property
    def mean_throughput(self) -> float:
        return sum(self.throughputs) / len(self.throughputs) if self.throughputs else 0.0
