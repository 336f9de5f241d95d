"""One classifier optimizer step with OOM recovery (D-8 / Annex 6) and a non-finite loss guard.

A *window* is the list of loader batches that make one optimizer step: the global batch G = loader batch x
loader accumulation. The step splits the window into micro-batches of OomState.batch_size (each weighted by
its share of the window's samples, so the gradient is the window mean whatever the split) and runs it under
`run_with_oom_recovery`; after every OOM the decision is applied OUTSIDE the except block and the SAME window
is replayed:
  S1 amp_fp16             CUDA: autocast fp16 + an enabled GradScaler. CPU: recorded only, autocast stays off
                          (a CPU "OOM" here is injected, and fp16 on CPU would only change the math).
  S2 microbatching        the window is split into smaller micro-batches with more accumulation: same G,
                          same samples, same LR/WD/schedule.
  S3 global_batch_change  LR and weight decay rescaled (scale_optimizer_hparams), schedule switched to samples;
                          the step returns None and the caller re-feeds the window's samples in windows of the
                          new G (the loop rewinds its sampler: same samples, same augmentation seeds).
  emergency_exit          emergency.pt is written, then OomExhaustedError.
Gradients are dropped before a replay (zero_grad), so the half-accumulated window never counts twice. Only the
forward/backward passes and the weight update are replayable; the scheduler and EMA advance after success.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pillsnap.train.monitors import NonFiniteLossError
from pillsnap.train.oom import (AMP_FP16, GLOBAL_BATCH_CHANGE, OomDecision, OomRecoveryExhausted, OomState,
                                run_with_oom_recovery, scale_optimizer_hparams, split_into_micro_batches)
from pillsnap.train.sample_schedule import switch_to_samples

log = logging.getLogger(__name__)

Batch = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # images, labels, dataset indices
_REWIND = object()  # the window was not stepped: its global batch no longer matches the OOM state



def apply_optimizer_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, grad_clip: float,
                           set_to_none: bool) -> None:
    """Clip after unscaling (so the threshold is in real gradient units), step, update the scaler, zero."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=set_to_none)

class OomExhaustedError(OomRecoveryExhausted):
    """OOM recovery ran out of options; the message names the emergency checkpoint and what to change."""

    def __init__(self, decision: OomDecision, checkpoint: Path):
        super().__init__(decision)
        self.checkpoint = checkpoint
        self.args = (f"{self.args[0]}. Emergency checkpoint: {checkpoint}. Lower train.classification.batch_size "
                     "or classification.image_size, enable optimization.amp, or use a GPU with more memory; "
                     "train.resume=last continues from the last regular checkpoint.",)


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def micro_batches(window: Sequence[Batch], size: int) -> List[Batch]:
    out: List[Batch] = []
    for batch in window:
        if len(batch[1]) <= size:
            out.append(batch)
        elif batch[2] is None:
            out.extend((x, y, None) for x, y in split_into_micro_batches(tuple(batch[:2]), size))
        else:
            out.extend(split_into_micro_batches(tuple(batch), size))
    return out


class ReplayPoint:
    """Model buffers (BatchNorm running statistics) and RNG state as they were before a step.

    A failed attempt has already updated BatchNorm statistics and drawn dropout noise; restoring both makes the
    replay the step that an OOM-free run would have taken. Capturing is one fused copy of the (small) buffers.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.buffers = [b for b in model.buffers()]
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


class TrainStepMixin:
    """The step half of ClassifierTrainer (it provides model, optimizer, scaler, policy, oom, state, ...)."""

    # ---------------------------------------------------------------- building blocks
    def _micro_step(self, batch: Batch, divisor: float) -> torch.Tensor:
        """Forward + backward of one micro-batch at weight 1/divisor; returns the detached loss (no sync)."""
        x, y, _ = batch
        dev = self.policy.device
        x = x.to(dev, non_blocking=True)
        if self.policy.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=self.policy.amp_dtype or torch.float32,
                            enabled=self.policy.amp_dtype is not None):
            loss = self.criterion(self.train_model(x), y)
        self.scaler.scale(loss / divisor).backward()
        return loss.detach()

    def _forward_backward(self, batch: Batch) -> float:
        """One micro-batch at weight 1/accum (the interleaved strategy drives the trainer with it)."""
        value = float(self._micro_step(batch, self.accum))
        if not math.isfinite(value):
            self._non_finite(value, [batch])
        return value

    def _apply_update(self) -> None:
        apply_optimizer_update(self.model, self.optimizer, self.scaler, self.cfg.train.grad_clip,
                               self.cfg.train.zero_grad_set_to_none)

    def _after_update(self) -> None:
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.global_step)

    def _optimizer_step(self) -> None:
        self._apply_update()
        self._after_update()

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, batches: Sequence[Batch]) -> Optional[float]:
        """One optimizer step over `batches` (loader batches of self.batch_size) with OOM recovery.

        Returns the window's mean loss and advances state.global_step; returns None when an OOM forced a global
        batch change (S3): the step was not taken and the caller must re-send these samples in windows of
        self.batch_size x self.accum (both already updated).
        """
        loss = self._guarded_step(batches)
        if loss is None:
            self._adopt_oom_batch()
            return None
        self._after_update()
        self.state.global_step += 1
        return loss

    def _guarded_step(self, window: Sequence[Batch]) -> Optional[float]:
        window_global_batch = self.batch_size * self.accum
        if getattr(self, "_replay_point", None) is None:
            self._replay_point = ReplayPoint(self.model, self.policy.device)
        self._replay_point.capture()

        def step(state: OomState) -> Any:
            if state.global_batch != window_global_batch:
                return _REWIND
            return self._window_step(window, state)

        try:
            result = run_with_oom_recovery(step, self.oom, self._apply_oom_decision)
        except OomRecoveryExhausted as stop:
            raise OomExhaustedError(stop.decision, self.ckpt_dir / "emergency.pt") from None
        return None if result is _REWIND else result

    def _window_step(self, window: Sequence[Batch], state: OomState) -> float:
        n = sum(len(b[1]) for b in window)
        total: Optional[torch.Tensor] = None
        for i, mb in enumerate(micro_batches(window, state.batch_size)):
            m = len(mb[1])
            loss = self._micro_step(mb, n / m)  # n / m == accum for equal micro-batches: the classic 1/accum
            total = loss * m if total is None else total + loss * m
            if i == 0:  # injected after a backward, so a replay must really drop the half-accumulated grads
                self.injector.maybe_raise(self.state.global_step + 1)
        value = float(total) / n  # the one device sync per optimizer step, before the weights change
        if not math.isfinite(value):
            self._non_finite(value, window)
        self._apply_update()
        return value

    def _non_finite(self, value: float, window: Sequence[Batch]) -> None:
        s = self.state
        ids = self._image_ids(window)
        self.optimizer.zero_grad(set_to_none=True)
        path = self._save("emergency.pt")  # weights before this step: still finite
        info = {"epoch": s.epoch + 1, "sample_offset": s.samples_in_epoch, "samples": sum(len(b[1]) for b in window),
                "images": ids[:8], "emergency_checkpoint": str(path)}
        log.error("non-finite loss %s at global step %d; emergency checkpoint %s", value, s.global_step + 1, path)
        raise NonFiniteLossError(s.global_step + 1, info, value)

    def _image_ids(self, window: Sequence[Batch]) -> List[str]:
        ids = self.train_data.image_ids
        return [ids[int(i)] for b in window if b[2] is not None for i in b[2]]

    # ---------------------------------------------------------------- applying OOM decisions
    def _apply_oom_decision(self, decision: OomDecision) -> None:
        s = self.state
        self.optimizer.zero_grad(set_to_none=True)  # drop the half-accumulated window before the replay
        self._replay_point.restore()
        self._reset_scaler_stage()
        event: Dict[str, Any] = {"action": decision.action, "global_step": s.global_step + 1, "epoch": s.epoch + 1,
                                 **{k: v for k, v in decision.audit.items() if k != "error"},
                                 "error": decision.audit.get("error", "")[:200]}
        self.oom_events.append(event)
        if decision.action == AMP_FP16:
            event["autocast"] = self._escalate_precision()
        elif decision.action == GLOBAL_BATCH_CHANGE:
            event.update(self._change_global_batch(decision))
        elif decision.is_exit:
            event["checkpoint"] = str(self._save("emergency.pt"))
        for tag, value in decision.tb_scalars().items():
            self.tb.scalar(tag, value, s.global_step)
        self.tb.flush()
        log.info("OOM event at global step %d recorded: %s", s.global_step + 1,
                 {k: v for k, v in event.items() if k != "error"})

    def _reset_scaler_stage(self) -> None:
        """A step that failed after unscale_ would make the replay's unscale_ raise: keep the scale, drop the stage."""
        if self.scaler.is_enabled():
            saved = self.scaler.state_dict()
            self.scaler = torch.amp.GradScaler(self.policy.device.type, enabled=True)
            self.scaler.load_state_dict(saved)

    def _escalate_precision(self) -> str:
        if self.policy.device.type != "cuda":
            log.warning("OOM recovery S1 on CPU: fp16 escalation recorded; autocast stays off (no CPU memory to "
                        "gain, and CPU fp16 would only change the math)")
            return "unchanged on cpu"
        if self.policy.amp_dtype != torch.float16:
            was = amp_name(self.policy.amp_dtype)
            self.policy = replace(self.policy, amp_dtype=torch.float16, use_scaler=True)
            self.scaler = torch.amp.GradScaler("cuda", enabled=True)
            log.warning("autocast now fp16 with a GradScaler (was %s)", was)
        return "fp16 + GradScaler"

    def _change_global_batch(self, decision: OomDecision) -> Dict[str, Any]:
        lr_before = self.optimizer.param_groups[0]["lr"]
        scale_optimizer_hparams(self.optimizer, self.scheduler, decision.lr_scale, decision.wd_scale)
        by_samples = switch_to_samples(self.scheduler, decision.state.global_batch)
        return {"lr_before": lr_before, "lr_after": self.optimizer.param_groups[0]["lr"],
                "base_lrs": list(getattr(self.scheduler, "base_lrs", [])),
                "weight_decay": self.optimizer.param_groups[0].get("weight_decay"),
                "schedule": "by_samples" if by_samples else "by_steps"}

    def _adopt_oom_batch(self) -> None:
        """After S3: the loader batch and accumulation become the OOM state's; the loader is rebuilt."""
        st = self.oom.state
        self.batch_size, self.accum = st.batch_size, st.grad_accum
        positions = self.state.epoch_positions or self.steps_per_epoch * st.global_batch
        self.steps_per_epoch = max(1, math.ceil(positions / st.global_batch))
        self._drop_train_loader()
        log.warning("training continues at batch %d x accum %d (global batch %d); the failed window's samples "
                    "are replayed", st.batch_size, st.grad_accum, st.global_batch)
