"""How many training processes a stage runs, decided from train.distributed and this machine's GPUs."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from pillsnap.config import ConfigError, DistributedConfig
from pillsnap.train.services.collectives import Collectives


@dataclass(frozen=True)
class LaunchSpec:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str
    backend: str  # nccl | gloo

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_spec(cfg: DistributedConfig, gpus: Optional[int] = None) -> LaunchSpec:
    """The processes this node starts; errors name the key. `gpus`: the visible CUDA devices (default: torch's)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    asked = str(cfg.nproc_per_node)
    nproc = max(1, gpus) if asked == "auto" else int(asked)
    if gpus and nproc > gpus:
        raise ConfigError(f"train.distributed.nproc_per_node={asked}: {nproc} processes but {gpus} visible GPU(s) "
                          "on this machine; one process drives one GPU")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if gpus else "gloo")
    if backend == "nccl" and not gpus:
        raise ConfigError("train.distributed.backend=nccl needs CUDA GPUs; this machine has none (use gloo)")
    spec = LaunchSpec(nproc, cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint, backend)
    if spec.distributed and cfg.sync_batchnorm and not gpus:
        raise ConfigError("train.distributed.sync_batchnorm=true: torch's SyncBatchNorm runs on CUDA GPUs only; "
                          "this machine has none (turn it off for CPU ranks)")
    return spec


def join_world(backend: str, rank: int, world: int, local: int, timeout_minutes: float) -> Collectives:
    """Inside a process torchrun started: join the process group; the rank's device is cuda:local or the CPU. A
    collective that waits past `timeout_minutes` (train.distributed.timeout_minutes) fails the group."""
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                             timeout=timedelta(minutes=timeout_minutes))
    return Collectives(rank, world, device)
