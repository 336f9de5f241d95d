"""A training unit: ONE model and everything that changes while it trains, behind one small interface.

A unit owns its model, loss, optimizer (AdamW), LR schedule, GradScaler, EMA and compile state, and its OOM
recovery, whose state is the one record of the knobs OOM recovery and batch plans change (micro-batch,
accumulation, autocast dtype): the unit reads them from there. Loops drive it with:

    loss = unit.forward_backward(batch, weight)   # one micro-batch; gradients accumulate
    unit.prepare_update()                          # clip after unscale (an OOM here is still replayable)
    unit.apply_update()                            # step, scaler update, zero grads
    unit.after_update()                            # the LR schedule and the EMA advance
    metrics = unit.validate()                      # fp32, on the eval weights (EMA when enabled)

and save / restore it with state_dict() / load_state_dict(). The classifier and the detector differ only in
what a batch is, how the loss is computed and how they are validated (units/classifier.py, units/detector.py);
per-model recipe settings (gradient clip, EMA) come from train.<model>, else from train.*.
"""
from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, replace
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from pillsnap.config import ModelTrainConfig, PillSnapConfig
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.services.oom_state_machine import OomDecision, OomPolicy, OomRecovery, OomState
from pillsnap.train.services.policy import CompiledModel, Policy
from pillsnap.train.services.schedule import lr_schedule, scale_optimizer_hparams, switch_to_samples

log = logging.getLogger(__name__)
Batch = Any
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


class ReplayPoint:
    """Model buffers (BatchNorm running statistics) and RNG state as they were before a step.

    A failed attempt has already updated BatchNorm statistics and drawn dropout noise; restoring both makes the
    replay the step that an OOM-free run would have taken. Capturing is one fused copy of the (small) buffers.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]
        self.device = device
        self.cpu_rng: Optional[torch.Tensor] = None
        self.cuda_rng: Optional[torch.Tensor] = None

    def capture(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        self.cpu_rng = torch.get_rng_state()
        if self.device.type == "cuda":
            self.cuda_rng = torch.cuda.get_rng_state(self.device)

    def restore(self) -> None:
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.saved)
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


class TrainUnit(ABC):
    name = "model"  # "classifier" | "detector": the key of its state in checkpoints and results
    log_tag = "[train]"
    config_key = "train"  # where its batch / lr live in the config (for messages)
    monitor, mode = "metric", "max"

    def __init__(self, cfg: PillSnapConfig, model_cfg: ModelTrainConfig, model: torch.nn.Module,
                 param_groups: Iterable, policy: Policy, compile_backend: Optional[Callable] = None,
                 world_size: int = 1):
        tc = cfg.train
        self.sync_batchnorm = world_size > 1 and tc.distributed.sync_batchnorm
        if self.sync_batchnorm:  # timm's conversion keeps BatchNormAct2d's activation; the Parameters stay the same
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        self.cfg, self.policy, self.model, self.world_size = cfg, policy, model, world_size
        self.train_model = CompiledModel(model, policy.compile_mode, compile_backend or policy.compile_backend)
        self.optimizer = torch.optim.AdamW(param_groups, lr=model_cfg.lr, weight_decay=tc.weight_decay,
                                           fused=policy.device.type == "cuda")
        self.grad_clip = tc.grad_clip if model_cfg.grad_clip is None else model_cfg.grad_clip
        use_ema = tc.ema.enabled if model_cfg.ema is None else model_cfg.ema
        self.ema = self._build_ema() if use_ema else None
        self.scheduler: Optional[torch.optim.lr_scheduler.LambdaLR] = None
        self.epochs = model_cfg.epochs
        self.eval_batch_size = model_cfg.batch_size
        accum = max(1, tc.grad_accum_steps)
        self.configured_global_batch = model_cfg.batch_size * accum
        self.oom = OomRecovery(OomPolicy.from_config(tc.oom),
                               OomState(model_cfg.batch_size, accum, amp_name(policy.amp_dtype)))
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=self.amp == "fp16")
        self.replay = ReplayPoint(model, policy.device)
        self.updates = 0  # optimizer steps taken

    def _build_ema(self):
        from timm.utils import ModelEmaV3

        ema = self.cfg.train.ema
        return ModelEmaV3(self.model, decay=ema.decay, use_warmup=ema.warmup)

    # ------------------------------------------------------------------ what differs per model
    @abstractmethod
    def loss(self, batch: Batch) -> torch.Tensor:
        """Forward pass and loss of one (micro-)batch through self.train_model, under the caller's autocast."""

    @abstractmethod
    def eval_forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        """One inference forward of `model` (probes measure its memory)."""

    @abstractmethod
    def split(self, batch: Batch, size: int) -> List[Batch]:
        """The batch as micro-batches of at most `size` samples (OOM S2 replays the same samples this way)."""

    @abstractmethod
    def batch_len(self, batch: Batch) -> int: ...

    @abstractmethod
    def sample_ids(self, batch: Batch) -> List[str]: ...

    @abstractmethod
    def validate(self, comm: Collectives = Collectives()) -> Dict[str, Any]:
        """Metrics on the validation data with the eval weights; must hold self.monitor (NaN when unmeasured).
        With several ranks every rank calls it, validates its slice, and gets the metrics of the whole set."""

    @abstractmethod
    def identity(self) -> Dict[str, Any]:
        """backbone, num_classes, class_map_hash, image_size: what check_compatible compares."""

    @abstractmethod
    def weights_payload(self) -> Dict[str, Any]:
        """The eval weights in this model's checkpoint schema (best.pt, warm start, export read it)."""

    # ------------------------------------------------------------------ the knobs (owned by the OOM state)
    @property
    def batch_size(self) -> int:
        """The micro-batch: the samples of one forward/backward."""
        return self.oom.state.batch_size

    @property
    def accum(self) -> int:
        return self.oom.state.grad_accum

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over every rank (each rank: micro-batch x accumulation)."""
        return self.oom.state.global_batch * self.world_size

    @property
    def amp(self) -> str:
        return self.oom.state.amp_dtype

    def set_batch(self, batch_size: int, accum: int) -> None:
        """A batch plan: the run starts at these knobs (what OOM recovery already decided is kept)."""
        self.oom.state = replace(self.oom.state, batch_size=batch_size, grad_accum=accum)

    @property
    def eval_module(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def plan_schedule(self, total_steps: int) -> None:
        tc = self.cfg.train
        self.scheduler = lr_schedule(self.optimizer, total_steps, tc.warmup_steps, tc.scheduler, self.global_batch)

    def forward_backward(self, batch: Batch, weight: float) -> torch.Tensor:
        """Loss of one micro-batch (detached, no device sync); its gradient is added at `weight`."""
        dtype = AUTOCAST[self.amp]
        with torch.autocast(self.policy.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = self.loss(batch)
        self.scaler.scale(loss * weight).backward()
        return loss.detach()

    def prepare_update(self) -> None:
        """Clip after unscaling (so the threshold is in real gradient units); the weights are still untouched, so
        an OOM here is replayed like one in a backward."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def apply_update(self) -> None:
        """Step, update the scaler, zero the gradients."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=self.cfg.train.zero_grad_set_to_none)

    def after_update(self) -> None:
        self.updates += 1
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)

    # ------------------------------------------------------------------ what OOM recovery changes
    def escalate_precision(self) -> str:
        """S1 (the OOM state now says fp16): fp16 autocast with a GradScaler, on a CPU as on a GPU."""
        if not self.scaler.is_enabled():
            self.scaler = torch.amp.GradScaler(self.policy.device.type, enabled=True)
            log.warning("%s: autocast now fp16 with a GradScaler", self.name)
        return "fp16 + GradScaler"

    def reset_scaler_stage(self) -> None:
        """A step that failed after unscale_ would make the replay's unscale_ raise: keep the scale, drop the stage."""
        if self.scaler.is_enabled():
            saved = self.scaler.state_dict()
            self.scaler = torch.amp.GradScaler(self.policy.device.type, enabled=True)
            self.scaler.load_state_dict(saved)

    def change_global_batch(self, decision: OomDecision) -> Dict[str, Any]:
        """S3: LR rescaled (weight decay kept: see oom_state_machine.py), the schedule counted in samples."""
        lr_before = self.lr
        scale_optimizer_hparams(self.optimizer, self.scheduler, decision.lr_scale)
        switch_to_samples(self.scheduler, self.global_batch)  # the state is already the new one
        return {"lr_before": lr_before, "lr_after": self.lr, "base_lrs": list(self.scheduler.base_lrs),
                "weight_decay": self.optimizer.param_groups[0].get("weight_decay"), "schedule": "by_samples"}

    # ------------------------------------------------------------------ state
    def state_dict(self, with_model: bool = True) -> Dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                 "oom_state_json": json.dumps(asdict(self.oom.state)),
                 "eval_batch_size": self.eval_batch_size, "updates": self.updates, "compile": self.train_model.state}
        if with_model:
            state["model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any], model_weights: Optional[Dict[str, Any]] = None) -> None:
        """Weights, optimizer, schedule, scaler, EMA and the knobs the run had reached (not the config's)."""
        self.model.load_state_dict(model_weights if model_weights is not None else state["model"])
        self.oom.state = OomState(**json.loads(state["oom_state_json"]))
        self.eval_batch_size, self.updates = int(state["eval_batch_size"]), int(state["updates"])
        if self.amp == "fp16":
            self.escalate_precision()  # before the scaler state is loaded into the (now enabled) scaler
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
