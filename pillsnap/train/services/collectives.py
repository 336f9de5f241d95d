"""What the training loop needs from the other ranks, and nothing when there are none.

The loop does DistributedDataParallel's two jobs itself: it broadcasts the weights from rank 0 at the start, and
all-reduces the gradients once per optimizer step. It does them after the ranks have agreed that nobody ran out of
memory: with DDP's backward hooks, a rank that hits an OOM in its forward never reaches the gradient all-reduce
the others are waiting in, and the job hangs instead of recovering. The price is that communication does not
overlap the backward pass (one flat all-reduce per step). Each rank scales its loss by its share of the global
window before the backward, as one process accumulating the same micro-batches does (so fp16 rounds alike), and the
gradient sum is corrected when an unreadable photo left a rank a sample short, so it stays the global mean.

`Collectives()` (world size 1) is the single-process path: every call returns at once.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch


class Collectives:
    def __init__(self, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ agreeing
    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, *values: float) -> Tuple[float, ...]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(t.tolist())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def smallest_batch_plans(self, plans: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """{model: {"batch": plan, "workers": plan}} with, per model, the batch plan of the rank whose node probed
        the smallest batch: every rank's slice of a global batch has the same size, so a node with a smaller GPU
        sets it for all (each node's tuning task probes its own GPU)."""
        if not self.active:
            return plans
        every = self.gather(plans)
        agreed = {model: dict(p) for model, p in plans.items()}
        for model in agreed:
            probed = [p[model]["batch"] for p in every if (p.get(model) or {}).get("batch") is not None]
            if probed:
                agreed[model]["batch"] = min(probed, key=lambda b: int(b["batch_size"]))
        return agreed

    # ------------------------------------------------------------------ tensors
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (the start of a run, and after a resume)."""
        if self.active:
            for t in [*module.parameters(), *module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """BatchNorm running statistics are each rank's own: their mean before evaluating or saving (timm's
        distribute_bn)."""
        if not self.active:
            return
        for b in module.buffers():
            if b.dtype.is_floating_point:
                torch.distributed.all_reduce(b.data)
                b.data /= self.world_size

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter], weight: float) -> None:
        """Sum over ranks of weight x each rank's gradient, in one flat all-reduce (weight: what turns the share this
        rank assumed into its true share of the window; 1 when every rank had as many samples)."""
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]) * weight
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def mean_loss(self, loss_sum: float, samples: int) -> Tuple[float, int]:
        """(the window's mean loss over every rank, its samples over every rank)."""
        total, n = self.sum(loss_sum, float(samples))
        return (total / n if n else math.nan), int(n)
