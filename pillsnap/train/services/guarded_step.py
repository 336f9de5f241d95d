"""One optimizer step of a training unit, run under OOM recovery (D-8 / Annex 6) and a non-finite loss guard.

A *window* is the list of loader batches that make one optimizer step: the global batch G = loader batch x
accumulation. The step splits the window into micro-batches of OomState.batch_size (each weighted by its share of
the window's samples, so the gradient is the window mean whatever the split). After every OOM the decision is
applied OUTSIDE the except block (so the traceback and the activations its frames hold are released first) and
the SAME window is replayed:
  S1 amp_fp16             autocast fp16 + an enabled GradScaler (on a CPU as on a GPU: torch has both).
  S2 microbatching        smaller micro-batches, more accumulation: same G, same samples, same LR/WD/schedule.
  S3 global_batch_change  LR rescaled (weight decay kept), schedule counted in samples; `step` returns None and the
                          loop re-feeds the window's samples in windows of the new G (same samples, same seeds).
  emergency_exit          emergency.pt is written, then OomExhaustedError.
Before a replay the gradients are dropped and BatchNorm statistics / RNG restored (ReplayPoint), so the
half-accumulated window never counts. A compile failure (the first forward or backward of a compiled model) is
replayed the same way on the eager model. The same guard runs both models, in both strategies.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pillsnap.config import ConfigError
from pillsnap.train.services.collectives import Collectives
from pillsnap.train.services.loss_monitors import NonFiniteLossError
from pillsnap.train.services.oom_state_machine import (AMP_FP16, GLOBAL_BATCH_CHANGE, FaultInjector, OomDecision,
                                         OomRecoveryExhausted, is_fatal_cuda_error, is_oom_error,
                                         release_cached_memory)
from pillsnap.train.services.telemetry import Telemetry

log = logging.getLogger(__name__)
Emergency = Callable[[], Path]  # writes emergency.pt with the weights before this step, returns its path


class OomExhaustedError(OomRecoveryExhausted):
    """OOM recovery ran out of options; the message names the emergency checkpoint and what to change."""

    def __init__(self, decision: OomDecision, checkpoint: Path, config_key: str):
        super().__init__(decision)
        self.checkpoint = checkpoint
        self.args = (f"{self.args[0]}. Emergency checkpoint: {checkpoint}. Lower {config_key}.batch_size or the "
                     "image size, enable optimization.amp, or use a GPU with more memory; train.resume=last "
                     "continues from the last regular checkpoint.",)


class StepGuard:
    """Runs one optimizer step of `unit` under OOM recovery: the unit's own OomRecovery decides, this applies.

    With several ranks (`comm`) every rank accumulates its slice of the window first; then the ranks agree whether
    any ran out of memory (one all-reduce) and all take the same D-8 step together, or all-reduce the gradients and
    step. The decision is the same on every rank because the state machine is deterministic and sees the same
    sequence of OOMs."""

    def __init__(self, unit, injector: FaultInjector, telemetry: Telemetry, comm: Optional[Collectives] = None,
                 release_memory: Callable[[], None] = release_cached_memory):
        self.unit, self.injector, self.telemetry = unit, injector, telemetry
        self.comm = comm or Collectives()
        self.release_memory = release_memory
        self.events: List[Dict[str, Any]] = []

    def step(self, window: Sequence[Any], step_number: int, epoch: int,
             emergency: Emergency) -> Optional[Tuple[float, int]]:
        """One optimizer step over `window`: (its mean loss, its samples) over every rank; None when S3 changed the
        global batch (the step was not taken; the unit's knobs are already the new ones and the caller re-feeds
        the samples); (nan, 0) when no rank had a readable sample. `emergency` writes emergency.pt (the weights
        before this step) when recovery is exhausted or the loss is not finite."""
        unit = self.unit
        window_batch = unit.global_batch
        unit.replay.capture()
        while True:
            if unit.global_batch != window_batch:
                return None
            local, error = self._guarded(lambda: self._accumulate(window, step_number), (0.0, 0))
            if self._recovered(error, step_number, epoch, emergency):
                continue
            value, samples = self._reduced(*local, window, step_number, emergency)
            if not samples:
                return value, samples
            _, error = self._guarded(unit.prepare_update, None)
            if self._recovered(error, step_number, epoch, emergency):
                continue
            unit.apply_update()  # the weights change: from here on nothing may be replayed
            unit.after_update()
            return value, samples

    def _guarded(self, work: Callable[[], Any], default: Any) -> Tuple[Any, Optional[str]]:
        """(work's result, None), or (default, the OOM's text); a compile failure falls back and runs `work` again
        on the eager model; anything else is raised."""
        unit = self.unit
        while True:
            try:
                return work(), None
            except Exception as exc:  # noqa: BLE001 - filtered right below
                if unit.train_model.fall_back(exc):
                    self._undo()
                    continue
                if is_fatal_cuda_error(exc) or not is_oom_error(exc):
                    raise
                if self.comm.active and unit.sync_batchnorm:  # the others wait inside a BatchNorm all-reduce
                    raise ConfigError(f"{unit.name}: out of memory with train.distributed.sync_batchnorm=true, "
                                      "where the ranks cannot agree on a recovery step; lower "
                                      f"{unit.config_key}.batch_size or turn sync_batchnorm off") from exc
                # Keep only the text: holding `exc` keeps its traceback and every tensor its frames reference.
                return default, f"{type(exc).__name__}: {exc}"

    def _recovered(self, error: Optional[str], step_number: int, epoch: int, emergency: Emergency) -> bool:
        """Whether any rank ran out of memory; if so every rank has taken the same D-8 step (replay next)."""
        if not self.comm.any(error is not None):
            return False
        self.release_memory()  # outside the except block: the failed step's tensors can go now
        self._apply(self.unit.oom.decide(error or "out of memory on another rank"), step_number, epoch, emergency)
        return True

    def _accumulate(self, window: Sequence[Any], step_number: int) -> Tuple[float, int]:
        """Forward and backward of this rank's micro-batches: (loss x samples, summed; samples)."""
        unit, world = self.unit, self.comm.world_size
        n = sum(unit.batch_len(b) for b in window)
        total: Optional[torch.Tensor] = None
        micro = [mb for b in window for mb in
                 ([b] if unit.batch_len(b) <= unit.batch_size else unit.split(b, unit.batch_size))]
        for i, mb in enumerate(micro):
            m = unit.batch_len(mb)
            # The micro-batch's share of the global window as if every rank had n samples: 1 / (accum x ranks) for
            # equal micro-batches, the factor one process applies before its backward too (identical fp16 rounding).
            loss = unit.forward_backward(mb, m / (n * world))
            total = loss * m if total is None else total + loss * m
            if i == 0:  # after a backward, so a replay must really drop the half-accumulated gradients
                self.injector.maybe_raise(step_number)
        return (float(total) if total is not None else 0.0), n  # the one device sync of a step

    def _reduced(self, loss_sum: float, n: int, window: Sequence[Any], step_number: int,
                 emergency: Emergency) -> Tuple[float, int]:
        """The window's loss and samples over every rank, and the gradients summed over the ranks; stops on a
        non-finite loss."""
        unit = self.unit
        value, samples = self.comm.mean_loss(loss_sum, n)
        if not samples:
            self._undo()
            return math.nan, 0
        if not math.isfinite(value):
            unit.optimizer.zero_grad(set_to_none=True)
            path = emergency()  # the weights before this step: still finite
            log.error("%s: non-finite loss %s at step %d; emergency checkpoint %s", unit.name, value, step_number,
                      path)
            raise NonFiniteLossError(step_number, {"model": unit.name, "samples": samples,
                                                   "images": [i for b in window for i in unit.sample_ids(b)][:8],
                                                   "emergency_checkpoint": str(path)}, value)
        # Exactly 1 when every rank had as many samples; otherwise each rank's part is corrected to its true share.
        self.comm.reduce_gradients(unit.model.parameters(), n * self.comm.world_size / samples)
        return value, samples

    def _undo(self) -> None:
        self.unit.optimizer.zero_grad(set_to_none=True)  # drop the half-accumulated window before the replay
        self.unit.replay.restore()
        self.unit.reset_scaler_stage()

    def _apply(self, decision: OomDecision, step_number: int, epoch: int, emergency: Emergency) -> None:
        self._undo()
        event: Dict[str, Any] = {"model": self.unit.name, "action": decision.action, "global_step": step_number,
                                 "epoch": epoch, **{k: v for k, v in decision.audit.items() if k != "error"},
                                 "error": decision.audit.get("error", "")[:200]}
        self.events.append(event)
        if decision.action == AMP_FP16:
            event["autocast"] = self.unit.escalate_precision()
        elif decision.action == GLOBAL_BATCH_CHANGE:
            event.update(self.unit.change_global_batch(decision))
        elif decision.is_exit:
            event["checkpoint"] = str(emergency())
        self.telemetry.scalars(decision.tb_scalars(), step_number)
        self.telemetry.tb.flush()
        log.info("%s: OOM event at step %d recorded: %s", self.unit.name, step_number,
                 {k: v for k, v in event.items() if k != "error"})
        if decision.is_exit:
            raise OomExhaustedError(decision, Path(event["checkpoint"]), self.unit.config_key)
