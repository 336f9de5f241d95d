"""What the ranks agree on: one process is a no-op, two gloo processes (spawned here) agree on an OOM flag, on the
smallest probed batch, and on gradients weighted by each rank's share of the samples."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pillsnap.train.services.collectives import Collectives

PLAN = {"classifier": {"batch": {"batch_size": 64, "grad_accum": 1}, "workers": None},
        "detector": {"batch": None, "workers": None}}


def test_one_process_is_the_plain_path():
    comm = Collectives()
    assert comm.any(True) and not comm.any(False)
    assert comm.smallest_batch_plans(PLAN) is PLAN and comm.gather(3) == [3]
    assert comm.mean_loss(6.0, 3) == (2.0, 3)
    grad = torch.ones(2)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = grad
    comm.reduce_gradients([p], 0.5)
    assert p.grad is grad  # untouched: one process owns the whole batch


def _rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    comm = Collectives(rank, 2)
    oom_anywhere = comm.any(rank == 1)  # only rank 1 ran out of memory
    mine = {"classifier": {"batch": {"batch_size": 64 if rank == 0 else 48, "grad_accum": 1}, "workers": None},
            "detector": {"batch": None, "workers": None}}
    agreed = comm.smallest_batch_plans(mine)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), float(rank + 1))  # rank 0's gradient 1, rank 1's gradient 2
    comm.reduce_gradients([p], 0.75 if rank == 0 else 0.25)  # rank 0 had 3 of the window's 4 samples
    loss = comm.mean_loss(3.0 if rank == 0 else 5.0, 3 if rank == 0 else 1)
    torch.save({"oom": oom_anywhere, "batch": agreed["classifier"]["batch"]["batch_size"], "grad": p.grad,
                "loss": loss}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["oom"] is True and seen["batch"] == 48
        assert torch.equal(seen["grad"], torch.full((2,), 0.75 * 1 + 0.25 * 2))
        assert seen["loss"] == (2.0, 4)
